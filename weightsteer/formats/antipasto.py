"""AntiPaSTO (custom PEFT type APASTOADAPTER, wassname/AntiPaSTO antipasto/peft_utils/antipasto_adapter.py) and its
predecessor InnerPiSSA (INNERPISSA, ipissa/peft_utils/innerpissa.py): SVD bases U (out × r), V (in × r), S, a
Cayley (or matrix-exp) rotation of V (and of U) and a shift of S, all driven by the coeff α.

Forward (get_adapted_output) at α: A = P − Pᵀ, clamped elementwise (AntiPaSTO: a·tanh(A/a), a = 2·tan(θmax/2),
when θmax < π − 1e-6; InnerPiSSA: θmax·tanh(A/θmax) when θmax < ∞); R = (I − αA/2)⁻¹(I + αA/2) (Cayley; AntiPaSTO
falls back to exp(αA) when singular) or exp(αA); V_rot = V·R_v, U_rot = U·R_u; S_α = S + α·ΔS (InnerPiSSA's
scale_s: add2 S + αΔs, add_tanh S + α·tanh(Δs)·S, mult exp(α·logλ)·S, none S);
y = ((x·V_rot)·S_α)·U_rotᵀ + x·W_resᵀ with W_res = W − U·diag(S)·Vᵀ. So
    W(α) = W + U·[R_u(α)·diag(S_α)·R_v(α)ᵀ − diag(S)]·Vᵀ      (rank ≤ r; not linear in α)
ScaleAdapter replaces α with the coeff, so weightsteer's c is α (c = 1: the trained strength). The forward has no
bias term: a biased target loses its bias at α ≠ 0, so such targets are refused. Bases come from
`0_svd_bases.safetensors` (svd_bases.<PeftModel module path, "." → "_">.{u,v,s}); InnerPiSSA's own save writes
none, and its data-aware bases cannot be recomputed, so it is read only with AntiPaSTO-layout bases beside it.
Runtime twin: the project's own `ScaleAdapter(model, coeff=c)` around its PEFT model.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from ..adapters.base import MODEL_PREFIX, AdapterFamily, ModuleState, Scheme, require, shape_error
from ..errors import AdapterError, UnsupportedAdapterError
from .base import Format

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASES_NAME = "0_svd_bases.safetensors"
BASES_PREFIXES = ("base_model_model_", "base_model_", "")  # the loader's tries, in order
SCALE_S = ("add2", "add_tanh", "mult", "none")
SCALE_S_TENSORS = {"add2": ("delta_s",), "add_tanh": ("delta_s",), "mult": ("loglambda_s",), "none": ()}
VARIANTS = {  # peft_type → (parameter prefix, default max_rotation_angle, clamp)
    "APASTOADAPTER": ("antipasto_", math.pi / 3, "tan"),
    "INNERPISSA": ("ipissa_", 0.3, "plain"),
}


def _at_coeff(state: ModuleState, c: float) -> ModuleState:
    return state.with_scalars(alpha=c)


def _rotation(params: torch.Tensor, alpha: float, state: ModuleState) -> torch.Tensor:
    A = params - params.T
    max_angle = state.scalars["max_angle"]
    if state.scalars["tan_clamp"]:
        if max_angle < math.pi - 1e-6:
            limit = 2 * math.tan(max_angle / 2)
            A = limit * torch.tanh(A / limit)
    elif max_angle < math.inf:
        A = max_angle * torch.tanh(A / max_angle)
    if not state.scalars["cayley"]:
        return torch.matrix_exp(alpha * A)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    try:
        return torch.linalg.solve(eye - alpha * A / 2, eye + alpha * A / 2)
    except RuntimeError:
        if not state.scalars["tan_clamp"]:  # InnerPiSSA has no fallback: its forward fails here too
            raise AdapterError(f"{state.path}: the Cayley rotation at coeff {alpha} is singular; the format's own forward fails too.") from None
        return torch.matrix_exp(alpha * A)


def _scaled_s(state: ModuleState, alpha: float) -> torch.Tensor:
    S, mode = state.tensors["S"], SCALE_S[int(state.scalars["scale_s"])]
    if mode == "add2":
        return S + alpha * state.tensors["delta_s"]
    if mode == "add_tanh":
        return S + alpha * torch.tanh(state.tensors["delta_s"]) * S
    if mode == "mult":
        return torch.exp(alpha * state.tensors["loglambda_s"]) * S
    return S


class SVDRotation(AdapterFamily):
    name = "AntiPaSTO / InnerPiSSA"
    peft_types = ()
    tokens = ("delta_s", "loglambda_s", "rotation_params_u", "rotation_params_v")
    schemes = {
        "coeff": Scheme(
            "coeff",
            "α → c: W + U·[R_u(c)·diag(S + c·ΔS)·R_v(c)ᵀ − diag(S)]·Vᵀ (rotations R(c·A))",
            "0: base · 1: trained · −1: the inverse rotations, S − ΔS",
            _at_coeff,
        )
    }

    def scheme(self, name):
        return super().scheme(name or "coeff")

    def parse(self, config, tensors, base_shapes, options):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, _, name = key.rpartition("|")
            modules.setdefault(path, {})[name] = tensor
        _, default_angle, clamp = VARIANTS[config["peft_type"]]
        scalars = {
            "alpha": 1.0,
            "max_angle": float(config.get("max_rotation_angle", default_angle)),
            "tan_clamp": float(clamp == "tan"),
            "cayley": float(config.get("rotation_method", "cayley") == "cayley"),
            "scale_s": float(SCALE_S.index(config.get("scale_s", "add2"))),
            "rotate_u": float(bool(config.get("rotate_u", False))),
            "rotate_v": float(bool(config.get("rotate_v", True))),
        }
        states = []
        for path, params in modules.items():
            require(params, path, "U", "V", "S", *SCALE_S_TENSORS[config.get("scale_s", "add2")])
            states.append(ModuleState(path, params, dict(scalars)))
        return states

    def weight(self, state, weight):
        U, V, S, alpha = state.tensors["U"], state.tensors["V"], state.tensors["S"], state.scalars["alpha"]
        middle = torch.diag(_scaled_s(state, alpha))
        if state.scalars["rotate_u"] and "rotation_params_u" in state.tensors:
            middle = _rotation(state.tensors["rotation_params_u"], alpha, state) @ middle
        if state.scalars["rotate_v"] and "rotation_params_v" in state.tensors:
            middle = middle @ _rotation(state.tensors["rotation_params_v"], alpha, state).T
        return weight + U @ (middle - torch.diag(S)) @ V.T

    def low_rank(self, state, shape):
        return None  # rank ≤ r, but the factors depend on c non-linearly: export-lora takes an SVD

    def check_shapes(self, state, weight_shape, bias_shape):
        if bias_shape is not None:
            raise UnsupportedAdapterError(
                f"{state.path} has a bias, which AntiPaSTO/InnerPiSSA's forward drops at every coeff ≠ 0 "
                "(get_adapted_output has no bias term); weightsteer does not invent a bias rule. Train without "
                "biased targets, or run the adapter with its own code."
            )
        found = (state.tensors["U"].shape[0], state.tensors["V"].shape[0])
        if found != tuple(weight_shape):
            raise shape_error(state.path, "U·Vᵀ shape vs the base weight", found, tuple(weight_shape))


class AntiPaSTO(Format):
    name = "antipasto"
    summary = "AntiPaSTO (APASTOADAPTER) / InnerPiSSA (INNERPISSA) folder with 0_svd_bases.safetensors"
    family = SVDRotation()
    runtime = "AntiPaSTO: with ScaleAdapter(model, coeff=c): ... (its PEFT model)"

    def detect(self, path):
        config = path / CONFIG_NAME if path.is_dir() else None
        if config is None or not config.is_file():
            return False
        try:
            data = json.loads(config.read_text())
        except (ValueError, OSError):
            return False
        # A malformed config is not this format's: load_adapter refuses it in one line.
        return isinstance(data, dict) and isinstance(data.get("peft_type"), str) and data["peft_type"] in VARIANTS

    def read(self, path):
        config = json.loads((path / CONFIG_NAME).read_text())
        prefix = VARIANTS[config["peft_type"]][0]
        if not (path / BASES_NAME).is_file():
            raise UnsupportedAdapterError(
                f"{path} has no {BASES_NAME}. {config['peft_type']}'s SVD bases U, S, V are needed to merge it: "
                "InnerPiSSA's save_adapter writes none, and its bases were picked data-aware (indices unsaved) and "
                "recomputed SVDs differ in sign across backends, so they cannot be rebuilt. Save them with "
                "AntiPaSTO's layout (svd_bases.<module>.{u,v,s}) beside the adapter."
            )
        params = load_file(str(path / WEIGHTS_NAME))
        bases = load_file(str(path / BASES_NAME))
        tensors: dict[str, torch.Tensor] = {}
        for key, tensor in params.items():
            module, _, name = key.removeprefix(MODEL_PREFIX).removesuffix(".default").rpartition("." + prefix)
            if not name:
                raise AdapterError(f"{path / WEIGHTS_NAME}: key {key!r} holds no {prefix} parameter.")
            tensors[f"{module}|{name}"] = tensor.float()
        for module in {k.partition("|")[0] for k in tensors}:
            found = _bases_for(module, bases)
            if found is None:
                raise AdapterError(f"{path / BASES_NAME} holds no svd_bases for {module}; the adapter folder is incomplete.")
            for name, tensor in zip(("U", "V", "S"), found):
                tensors[f"{module}|{name}"] = tensor.float()
        if config.get("scale_s", "add2") not in SCALE_S:
            raise AdapterError(f"{path / CONFIG_NAME}: unknown scale_s {config['scale_s']!r} (known: {', '.join(SCALE_S)}).")
        return self.artefact(path, config, tensors)


def _bases_for(module: str, bases: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
    """U, V, S of an HF module path: the loader compares mangled names ("." → "_"), trying its prefixes in order."""
    mangled = module.replace(".", "_")
    for prefix in BASES_PREFIXES:
        key = f"svd_bases.{prefix}{mangled}"
        if f"{key}.u" in bases:
            return bases[f"{key}.u"], bases[f"{key}.v"], bases[f"{key}.s"]
    return None
