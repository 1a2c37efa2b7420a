"""HRA: a chain of Householder reflections of the layer input.

PEFT forward (peft/tuners/hra/layer.py, HRALinear.get_delta_weight / forward):
  H = (I − 2û_1û_1ᵀ)(I − 2û_2û_2ᵀ)⋯(I − 2û_rû_rᵀ),  û_i = u_i/‖u_i‖ the columns of hra_u (in, r)
  apply_GS: H = I − 2QQᵀ, Q the Gram–Schmidt orthonormalisation of hra_u's columns
  y = (W H) x + b
Merged: W' = W H, bias unchanged. H moves only the r-dim span of U: with B an orthonormal basis of it and
K = Bᵀ H B (r×r, orthogonal), H = I + B (K − I) Bᵀ, so W H^c = W + (W B)(K^c − I) Bᵀ — r-dim work, no
dense in×in matrix.

hra_u is normalised, so PEFT has no strength parameter: the default scheme is `delta`.
"""

from __future__ import annotations

import torch

from ..errors import SchemeError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys
from .orthogonal import HookFactory, real_power, replace_hook


def _power(state: ModuleState, c: float) -> ModuleState:
    if not float(c).is_integer() and _is_reflection(state):
        raise SchemeError(
            f"HRA module {state.path}: HRA with apply_GS / odd r is a reflection; it has no real fractional power. "
            "Use an integer coeff or --scheme delta."
        )
    if state.scalars["apply_GS"] and c != 0 and c % 2 == 0:
        raise SchemeError(
            f"HRA module {state.path}: with apply_GS, H = I − 2QQᵀ is its own inverse, so every even coeff gives the "
            "base model back and every odd coeff the trained one. Use --scheme delta to scale it."
        )
    return state.with_scalars(power=c)


class HRA(AdapterFamily):
    name = "HRA"
    peft_types = ("HRA",)
    composes_additively = False  # PEFT applies several of them one after another
    tokens = ("hra_u",)
    schemes = {
        "power": Scheme(
            "power",
            "H → H^c (computed in the r-dim span of hra_u)",
            "0: base · 1: trained · −1: exact inverse Hᵀ; fractional c needs even r without apply_GS",
            _power,
        ),
    }

    def scheme(self, name: str | None) -> Scheme:
        if name is not None and name.startswith("knob:"):
            raise SchemeError(
                "HRA normalises every column of hra_u, so multiplying it by c changes nothing (and c = 0 divides "
                "by zero). Use --scheme delta (the default) or --scheme power."
            )
        return super().scheme(name or "delta")

    def knob_names(self) -> tuple[str, ...]:
        return ()

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, "hra_u")
            scalars = {"apply_GS": float(bool(config.get("apply_GS", False)))}
            states.append(ModuleState(path, {"hra_u": params["hra_u"]}, scalars))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        if len(weight_shape) != 2:
            raise UnsupportedAdapterError(
                f"HRA module {state.path}: HRA on a {len(weight_shape)}-d (convolution) weight is not supported."
            )
        features = state.tensors["hra_u"].shape[0]
        if weight_shape[1] != features:
            raise shape_error(state.path, "input features", features, weight_shape[1])

    def weight(self, state, weight):
        basis, shift = _span(state, state.scalars.get("power", 1.0))
        return weight + ((weight.double() @ basis) @ shift).to(weight.dtype) @ basis.T.to(weight.dtype)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        scalars = {"apply_GS": float(bool(layer.hra_apply_GS[adapter]))}
        return ModuleState(path, {"hra_u": layer.hra_u[adapter].detach().clone()}, scalars)

    def set_live_state(self, layer, adapter, state):
        layer.hra_u[adapter].data.copy_(state.tensors["hra_u"])
        layer.hra_apply_GS[adapter] = bool(state.scalars["apply_GS"])
        power = state.scalars.get("power", 1.0)
        replace_hook(layer, adapter, None if power == 1.0 else _input_hook(state, power))


def _is_reflection(state: ModuleState) -> bool:
    """det H = −1 (odd r), or H = −I on the span (apply_GS): H has eigenvalue −1."""
    return bool(state.scalars["apply_GS"]) or state.tensors["hra_u"].shape[1] % 2 == 1


def _gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns, in PEFT's order and arithmetic (modified Gram–Schmidt, get_delta_weight)."""
    basis: list[torch.Tensor] = []
    for column in u.T:
        for done in basis:
            column = column - (done @ column) * done
        basis.append(column / column.norm())
    return torch.stack(basis, dim=1)


def _reflect_rows(x: torch.Tensor, u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """x H, as r rank-1 updates x ← x − 2 (x û_i) û_iᵀ in PEFT's order (or x − 2 (x Q) Qᵀ with apply_GS)."""
    if gram_schmidt:
        q = _gram_schmidt(u)
        return x - 2 * (x @ q) @ q.T
    for unit in (u / u.norm(dim=0)).T:
        x = x - 2 * torch.outer(x @ unit, unit)
    return x


def _span(state: ModuleState, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K^c − I) in float64: H^c = I + B (K^c − I) Bᵀ with B an orthonormal basis of span(hra_u)."""
    u = state.tensors["hra_u"].double()
    basis = torch.linalg.qr(u).Q  # orthonormal even when columns repeat (PEFT's symmetric init)
    rotation = _reflect_rows(basis.T, u, bool(state.scalars["apply_GS"])) @ basis  # K = Bᵀ H B
    refusal = (
        f"HRA module {state.path}: H turns some plane by exactly π (eigenvalue −1), so its fractional powers have no "
        "real value. Use an integer coeff or --scheme delta."
    )
    powered = real_power(rotation, power, refusal)
    return basis, powered - torch.eye(powered.shape[0], dtype=powered.dtype, device=powered.device)


def _input_hook(state: ModuleState, power: float) -> HookFactory:
    """A pre-hook on the live HRA layer: x → H^{c−1} x, so that its forward's W H gives W H^c.

    (hra_u cannot hold H^c in general: with apply_GS it always gives −I on its span, with odd r a reflection.)
    In rows: x ← x + (x B)(K^{c−1} − I)ᵀ Bᵀ.
    """
    basis, shift = (t.float() for t in _span(state, power - 1))

    def hook(module, args):
        x = args[0]
        rotated = x + ((x.to(basis.dtype) @ basis) @ shift.T @ basis.T).to(x.dtype)
        return (rotated, *args[1:])

    return lambda module: module.register_forward_pre_hook(hook)
