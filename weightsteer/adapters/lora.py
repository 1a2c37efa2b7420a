"""LoRA: plain, rsLoRA, rank/alpha patterns, lora_bias, embedding LoRA, DoRA and the fixed-weight variants.

PEFT forward (peft/tuners/lora/layer.py, variants.py):
  Linear     y = W x + b + s·B A x (+ s·b_B with lora_bias),  s = α/r or α/√r (rsLoRA)
  Embedding  e = E[t] + s·B_e A_e[:, t]   (both sides times embed_scale, so it factors out)
  DoRA       y = diag(m / ‖W + sBA‖_row)(W + sBA) x + b;  on an embedding (DoraEmbeddingLayer, fan_in_fan_out)
             the norms are per embedding dimension: E' = (E + sΔ) diag(m / ‖E + sΔ‖_col)
  BD-LoRA    A (modules matching use_bdlora.target_modules_bd_a) or B (…_bd_b) is block-diagonal, stored as
             its nblocks diagonal blocks stacked (BlockDiagonalLinear); merged as the dense block_diag
  KaSA       at load PEFT replaces W by W_t, W without its r smallest singular components, and adds
             s·B diag(lora_diag) A (KasaLinearVariant); coeff scales that update, the truncation stays
  VeLoRA, MonteCLoRA: plain LoRA at inference (their extra tensors act only in training)
  trainable_token_indices: rows of an embedding retrained whole, saved as
             `<embedding>.token_adapter.trainable_tokens_delta`; merged as TrainableTokens rows.
  target_parameters (ParamWrapper, e.g. MoE expert stacks P of shape experts×d₁×d₂):
             P[e] + s·L[e] R[e], with L, R from lora_A (r·E × in) and lora_B (out × r·E) as in
             ParamWrapper.get_delta_factors; each stored tensor (one expert's gate half, say) gets its slice.
"""

from __future__ import annotations

import math
import re

from typing import TYPE_CHECKING

import torch

from ..errors import AdapterError, SchemeError, UnsupportedAdapterError
from .base import (
    AdapterFamily,
    ModuleState,
    Scheme,
    ShapeLookup,
    pattern_value,
    require,
    scale_mix,
    shape_error,
    split_keys,
    toward,
)

from .trainable_tokens import (
    ROWS,
    check_token_shapes,
    config_token_indices,
    live_token_state,
    merged_rows,
    set_live_token_state,
    token_state,
)

if TYPE_CHECKING:
    from ..names import ModelParameter

RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")
LORA_TOKENS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_diag")
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # TrainableTokensWrapper.adapter_state_dict (peft/utils/other.py)
# Saved by VeLoRA / MonteCLoRA for training only; at inference their forward is plain LoRA (variants.py).
TRAINING_ONLY = ("lora_velora_embed", "lora_monteclora_sampler")
KASA_RUNTIME = (
    "KaSA replaced the live model's base weights by their truncation W_t when PEFT loaded the adapter, so the base "
    "a coeff ≠ 1 interpolates from is gone at runtime. Use knob:scaling (W_t + c·sBdA) here, or compare against "
    "a merged checkpoint."
)
ALORA_REASON = (
    "Activated LoRA (alora_invocation_tokens) changes the output only from the first invocation token on, so its "
    "effect depends on the input and no fixed weight reproduces it (PEFT cannot merge it either). Keep it as a "
    "runtime adapter, or train an ordinary LoRA."
)
PEFT_TIED_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES: the names PEFT ties by


def _scale(state: ModuleState, c: float) -> ModuleState:
    if ROWS in state.tensors:  # trainable_token_indices rows: E[idx] + c(new − E[idx])
        return scale_mix(state, c)
    # DoRA: m(c) = ‖W‖_row + c(m − ‖W‖_row); KaSA: W + c(W_t − W). Both need W, so the mix is applied in weight().
    mixes = {name: c * state.scalars[name] for name in ("truncation_mix",) if name in state.scalars}
    return state.with_scalars(
        scaling=c * state.scalars["scaling"], magnitude_mix=c * state.scalars.get("magnitude_mix", 1.0), **mixes
    )


class LoRA(AdapterFamily):
    name = "LoRA"
    peft_types = ("LORA",)
    tokens = (*LORA_TOKENS, TOKEN_ROWS, *TRAINING_ONLY)
    nested = True  # MonteCLoRA's sampler tensors sit one level down; dropped in parse
    knobs = ("scaling",)
    schemes = {
        "linear": Scheme(
            "linear",
            "scale → c·scale (DoRA also m → ‖W‖ + c(m − ‖W‖); KaSA also W → W + c(W_t − W); trainable tokens E[idx] + c(new − E[idx]))",
            "0: base · 1: trained · −1: W − sBA (DoRA: not an inverse)",
            _scale,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
            raise AdapterError(
                f"This LoRA was initialised with {init!r}, which moves the adapter's starting value out of the base "
                "weights; it only reproduces the fine-tune on that modified (residual) base. Convert it to an "
                "ordinary LoRA with PEFT: `model.save_pretrained(out, path_initial_model_for_weight_conversion="
                "<folder saved right after init>)`, then merge the converted adapter."
            )
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        rslora = bool(config.get("use_rslora", False))
        states = []
        for path, params in modules.items():
            params = {_unnested(n): t for n, t in params.items() if not n.startswith(TRAINING_ONLY)}
            if TOKEN_ROWS in params:
                states.append(token_state(path, params.pop(TOKEN_ROWS), _token_indices(config, path)))
            if not params or not _loaded_by_peft(config, path):
                continue
            target = _targeted_parameter(config, path, base_shapes)
            if target is not None:
                states.append(_parameter_state(config, *target, params))
                continue
            embedding = "lora_embedding_A" in params
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            require(params, path, a_name, b_name)
            _expand_block_diagonal(config, path, params)
            _check_rank(config, path, params[a_name], params[b_name], a_name, b_name)
            rank = params[a_name].shape[0]
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            if "lora_magnitude_vector" in params:
                params["lora_magnitude_vector"] = params["lora_magnitude_vector"].reshape(-1)
            layer = "embedding" if embedding else "linear"
            scalars = {"scaling": scaling, **({"truncation_mix": 1.0} if "lora_diag" in params else {})}
            states.append(
                ModuleState(
                    path,
                    params,
                    scalars,
                    layer=layer,
                    fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and layer == "linear",
                )
            )
        return states

    def knob_names(self):
        return (*LORA_TOKENS, *self.knobs)  # token rows are a replacement: knobs leave them as trained

    def refusal(self, config):
        if config.get("alora_invocation_tokens"):
            return ALORA_REASON
        if config.get("layer_replication"):
            return (
                f"it was trained with layer_replication={config['layer_replication']}: PEFT stacks copies of base "
                "layers into a deeper model and trains each copy separately, so the adapted model has more layers than "
                "the base checkpoint. weightsteer writes the base's own layers only; merge with PEFT "
                "(merge_and_unload) and save the deeper model instead."
            )
        return None

    def check_live_delta(self, layer, adapter):
        if adapter in getattr(layer, "lora_diag", {}):
            raise SchemeError(KASA_RUNTIME)

    def tied_head_follows(self, config):
        # With trainable_token_indices PEFT ties the head's token adapter to the embedding's
        # (peft/utils/other.py, should_apply_tying); rows saved for the head as well mean it was not tied.
        # ensure_weight_tying ties only when target_modules or modules_to_save name a module PEFT_TIED_NAMES knows
        # (BaseTuner._check_tied_modules): with GPT-2's `wte` or Falcon's `word_embeddings` the head stays the base.
        if config.get("trainable_token_indices") is not None:
            return True
        named = [*(config.get("modules_to_save") or []), *_list(config.get("target_modules"))]
        by_pattern = isinstance(config.get("target_modules"), str) and any(
            re.fullmatch(config["target_modules"], n) for n in PEFT_TIED_NAMES
        )
        return bool(config.get("ensure_weight_tying")) and (by_pattern or any(n.split(".")[-1] in PEFT_TIED_NAMES for n in named))

    def check_shapes(self, state, weight_shape, bias_shape):
        if ROWS in state.tensors:
            return check_token_shapes(state, weight_shape)
        a, b = _factors(state)
        if state.layer == "embedding":
            expected = (a.shape[1], b.shape[0])
        else:  # linear (out×in) or experts (experts×out×in): ΔW = B A, batched over experts
            expected = (*b.shape[:-1], a.shape[-1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))
        if "lora_B.bias" in state.tensors and bias_shape is None:
            raise AdapterError(
                f"LoRA adapter at {state.path} trains a bias (lora_bias=True) but the base layer has none; a merged "
                "checkpoint would need a new bias tensor the architecture cannot load."
            )

    def weight(self, state, weight):
        if ROWS in state.tensors:
            return merged_rows(state, weight)
        if state.layer == "experts":  # as PEFT's _LoraFactorsProxy: baddbmm(W, lhs, rhs, alpha=scaling)
            a, b = _factors(state)
            return torch.baddbmm(weight, b, a, alpha=state.scalars["scaling"])
        left, right = _factors_in_weight_orientation(state)
        if "lora_diag" in state.tensors:  # KaSA: the truncated base W_t (mixed as W + c(W_t − W)) plus s·B diag(d) A
            weight = toward(weight, kasa_truncated(weight, left.shape[1]), state.scalars["truncation_mix"])
        merged = torch.addmm(weight, left, right, alpha=state.scalars["scaling"])
        if "lora_magnitude_vector" not in state.tensors:
            return merged
        dim = _norm_dim(state)
        magnitude = _magnitude(state, weight)
        return (magnitude / torch.linalg.norm(merged, dim=dim)).unsqueeze(dim) * merged

    def low_rank(self, state, shape):
        """ΔW = s·B A (embedding: s·(B_e A_e)ᵀ), in weight()'s orientation; DoRA's row norms make it full rank,
        and trainable-token rows are no product of factors."""
        if "lora_magnitude_vector" in state.tensors or ROWS in state.tensors or "lora_diag" in state.tensors:
            return None
        if state.layer == "experts":
            return None
        left, right = _factors_in_weight_orientation(state)
        return state.scalars["scaling"] * left, right

    def changes_bias(self, state):
        return "lora_B.bias" in state.tensors

    def slice_state(self, state, stored):
        """The change of one stored tensor: rows/columns of L and R per the slice, per expert (L R is linear in
        each factor, so slicing the factors slices the product). A stored tensor whose dims run the other way
        round gets ΔWᵀ = Rᵀ Lᵀ."""
        lhs, rhs = state.tensors["lora_B"], state.tensors["lora_A"]
        index, dims = stored.index, stored.dims
        if lhs.dim() == 2:  # a 2-D parameter: one "expert"
            lhs, rhs, index, dims = lhs[None], rhs[None], (0, *index), tuple(d + 1 for d in dims)
        experts, rows, cols = index
        running = [d for d, i in enumerate(index) if not isinstance(i, int)]
        if isinstance(rows, int) or isinstance(cols, int) or sorted(dims) != running or dims[0] != running[0]:
            raise UnsupportedAdapterError(
                f"{state.path}: the stored tensor {stored.name} is laid out in a way weightsteer cannot slice yet."
            )
        lhs, rhs = lhs[experts][..., rows, :], rhs[experts][..., :, cols]
        if dims[-2] > dims[-1]:  # stored transposed
            lhs, rhs = rhs.transpose(-2, -1), lhs.transpose(-2, -1)
        layer = "experts" if lhs.dim() == 3 else "linear"
        path = stored.name.removesuffix(".weight")  # the stored tensor's own module, e.g. …experts.3.w1
        return ModuleState(path, {"lora_B": lhs.contiguous(), "lora_A": rhs.contiguous()}, dict(state.scalars), layer)

    def bias(self, state, bias):
        if "lora_B.bias" not in state.tensors:
            return bias
        return bias + state.scalars["scaling"] * state.tensors["lora_B.bias"]

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        if hasattr(layer, "trainable_tokens_delta"):  # the TrainableTokensLayer inside TrainableTokensWrapper
            return live_token_state(layer, adapter, path)
        if adapter in layer.lora_embedding_A:
            tensors = {"lora_embedding_A": layer.lora_embedding_A[adapter], "lora_embedding_B": layer.lora_embedding_B[adapter]}
        else:
            tensors = {"lora_A": layer.lora_A[adapter].weight, "lora_B": layer.lora_B[adapter].weight}
            if getattr(layer.lora_B[adapter], "bias", None) is not None:
                tensors["lora_B.bias"] = layer.lora_B[adapter].bias
        if adapter in layer.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].weight
        scalars = {"scaling": layer.scaling[adapter]}
        if adapter in getattr(layer, "lora_diag", {}):
            tensors["lora_diag"] = layer.lora_diag[adapter]
            scalars["truncation_mix"] = 1.0
        kind = "embedding" if "lora_embedding_A" in tensors else "linear"
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return ModuleState(path, tensors, scalars, layer=kind)

    def set_live_state(self, layer, adapter, state):
        if ROWS in state.tensors:
            return set_live_token_state(layer, adapter, state)
        if state.scalars.get("truncation_mix", 1.0) != 1.0:
            raise SchemeError(KASA_RUNTIME)
        layer.scaling[adapter] = state.scalars["scaling"]
        params = {
            "lora_embedding_A": lambda: layer.lora_embedding_A[adapter],
            "lora_embedding_B": lambda: layer.lora_embedding_B[adapter],
            "lora_A": lambda: layer.lora_A[adapter].weight,
            "lora_B": lambda: layer.lora_B[adapter].weight,
            "lora_B.bias": lambda: layer.lora_B[adapter].bias,
            "lora_diag": lambda: layer.lora_diag[adapter],
        }
        for name, value in state.tensors.items():
            if name in params:
                params[name]().data.copy_(value)
        if "lora_magnitude_vector" in state.tensors:
            weight = layer.get_base_layer().weight.detach().float()
            dora = layer.lora_magnitude_vector[adapter]
            transposed = getattr(layer, "fan_in_fan_out", False) and state.layer != "embedding"
            dora.weight.data.copy_(_magnitude(state, weight.T if transposed else weight))
            dora._cache_clear()


def _list(value: object) -> list[str]:
    return list(value) if isinstance(value, (list, tuple, set)) else []


def _loaded_by_peft(config: dict, path: str) -> bool:
    """With ensure_weight_tying PEFT saves the tied head's LoRA (a view of the embedding's) but its saved
    target_modules no longer name the head; loading wraps only what target_modules names
    (check_target_module_exists: the path, or a suffix after a dot), so such head weights are never loaded."""
    targets = config.get("target_modules")
    if not config.get("ensure_weight_tying") or not isinstance(targets, list):
        return True
    return any(path == t or path.endswith("." + t) for t in targets)


def _targeted_parameter(config: dict, path: str, base_shapes: ShapeLookup) -> tuple[str, "ModelParameter"] | None:
    """(parameter path, parameter) when the saved module `path` is a PEFT ParamWrapper (target_parameters).

    PEFT wraps a module's targeted parameters one after the other in the module's parameter order, each wrapper
    around the previous (peft/tuners/tuners_utils.py, _inject_parameters), so the last is outermost and a saved
    key has one `.base_layer` for each wrapper outside it.
    """
    targets = config.get("target_parameters") or []
    if not targets:
        return None
    parts = path.split(".")
    module = ".".join(p for p in parts if p != "base_layer")
    depth = len(parts) - len(module.split("."))
    params = base_shapes.parameters(module)
    targeted = [
        p for name, p in params.items() if any(f"{module}.{name}" == t or f"{module}.{name}".endswith("." + t) for t in targets)
    ]
    if not targeted:
        return None
    if depth >= len(targeted):
        raise AdapterError(f"Adapter module {path}: target_parameters matches only {len(targeted)} parameters of {module}.")
    parameter = targeted[len(targeted) - 1 - depth]
    return f"{module}.{parameter.name}", parameter


def _parameter_state(config: dict, path: str, parameter: "ModelParameter", params: dict[str, torch.Tensor]) -> ModuleState:
    """ParamWrapper's delta as factors, Δ = s·L R in the parameter's layout (peft/tuners/lora/layer.py,
    ParamWrapper.get_delta_factors; a 2-D parameter uses Linear.get_delta_weight, s·B A):
    lora_A (r·E × in) → A_e (r × in); lora_B (out × r·E) → B_e (out × r), column j·E + e;
    experts stored (E, out, in): L = B_e, R = A_e; stored (E, in, out) (`is_transposed`): L = A_eᵀ, R = B_eᵀ."""
    require(params, path, "lora_A", "lora_B")
    a, b = params["lora_A"], params["lora_B"]
    shape = parameter.shape
    experts = shape[0] if len(shape) == 3 else 1
    rank = a.shape[0] // experts
    alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if len(shape) == 2:
        lhs, rhs = b, a
    else:
        a_e = a.reshape(experts, rank, a.shape[1])
        b_e = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)
        lhs, rhs = (a_e.transpose(1, 2), b_e.transpose(1, 2)) if parameter.transposed else (b_e, a_e)
    if (*lhs.shape[:-1], rhs.shape[-1]) != shape or a.shape[0] != rank * experts:
        raise shape_error(path, "parameter shape", (*lhs.shape[:-1], rhs.shape[-1]), shape)
    return ModuleState(path, {"lora_B": lhs.contiguous(), "lora_A": rhs.contiguous()}, {"scaling": scaling}, layer="parameter")


def _token_indices(config: dict, path: str) -> list[int]:
    """trainable_token_indices: a list (for the input embedding) or {module name: list}, matched as
    PEFT's _set_trainable does (the module path ends with the name)."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        names = [name for name in indices if path.endswith(name)]
        if not names:
            raise AdapterError(f"Adapter stores trainable token rows for {path}, but trainable_token_indices names no such module.")
        indices = indices[names[0]]
    return config_token_indices(indices, f"trainable_token_indices for {path}")


def _check_rank(config: dict, path: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    """A (r × in) and B (out × r) must share the rank the config gives (PEFT sizes its layers from the config)."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"Adapter module {path}: {a_name} has shape {tuple(a.shape)} and {b_name} {tuple(b.shape)}; their ranks "
            "disagree, so the adapter file is inconsistent."
        )
    configured = pattern_value(config.get("rank_pattern"), path, config.get("r"))
    if configured is not None and configured != a.shape[0]:
        raise AdapterError(
            f"Adapter module {path}: adapter_config.json gives r = {configured}, but its tensors have rank {a.shape[0]}; "
            "PEFT cannot load this adapter either. Fix r (or rank_pattern) in the config."
        )


def _factors(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    if state.layer == "embedding":
        return state.tensors["lora_embedding_A"], state.tensors["lora_embedding_B"]
    return state.tensors["lora_A"], state.tensors["lora_B"]


def _factors_in_weight_orientation(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with ΔW/s = left @ right in weight()'s orientation; KaSA's diagonal goes into left."""
    a, b = _factors(state)
    if state.layer == "embedding":
        return a.T, b.T
    if "lora_diag" in state.tensors:
        b = b * state.tensors["lora_diag"]
    return b, a


def _norm_dim(state: ModuleState) -> int:
    """DoRA normalises rows of a Linear weight, columns of an embedding (one norm per embedding dimension)."""
    return 0 if state.layer == "embedding" else 1


def _magnitude(state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
    """DoRA magnitude at the state's mix: m(c) = ‖W‖ + c(m − ‖W‖) (norms as _norm_dim), exactly m at c = 1."""
    norms = torch.linalg.norm(weight, dim=_norm_dim(state))
    return toward(norms, state.tensors["lora_magnitude_vector"], state.scalars.get("magnitude_mix", 1.0))


def kasa_truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """KasaLinearVariant._truncate_base_weight: W without its `rank` smallest singular components (fp32 SVD)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    kept = min(weight.shape) - rank
    return (u[:, :kept] * s[:kept]) @ vh[:kept, :]


def _unnested(name: str) -> str:
    """split_keys(nested=True) keeps `lora_A.weight`; LoRA's states use the bare parameter names (`lora_A`)."""
    return name.removesuffix(".weight")




def _expand_block_diagonal(config: dict, path: str, params: dict[str, torch.Tensor]) -> None:
    """BD-LoRA: the stored factor holds its diagonal blocks stacked along dim 0 (BlockDiagonalLinear.weight);
    the dense factor is torch.block_diag of them (weight_as_blockdiagonal_matrix). Matching as
    BdLoraLinearVariant.init does: `pattern in target_name` (the module path)."""
    bdlora = config.get("use_bdlora")
    if not bdlora:
        return
    blocks = int(bdlora.get("nblocks", 1))
    for name, patterns in (("lora_A", bdlora.get("target_modules_bd_a")), ("lora_B", bdlora.get("target_modules_bd_b"))):
        if name in params and any(pattern in path for pattern in patterns or ()):
            params[name] = torch.block_diag(*torch.chunk(params[name], blocks, dim=0))
