"""LoRA: plain, rsLoRA, rank/alpha patterns, lora_bias, embedding LoRA and DoRA.

PEFT forward (peft/tuners/lora/layer.py):
  Linear     y = W x + b + s·B A x (+ s·b_B with lora_bias),  s = α/r or α/√r (rsLoRA)
  Embedding  e = E[t] + s·B_e A_e[:, t]   (both sides times embed_scale, so it factors out)
  DoRA       y = diag(m / ‖W + sBA‖_row)(W + sBA) x + b
  trainable_token_indices: rows of an embedding retrained whole, saved as
             `<embedding>.token_adapter.trainable_tokens_delta`; merged as TrainableTokens rows.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, pattern_value, require, scale_mix, shape_error, split_keys, toward

from .trainable_tokens import (
    ROWS,
    check_token_shapes,
    config_token_indices,
    live_token_state,
    merged_rows,
    set_live_token_state,
    token_state,
)

RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")
LORA_TOKENS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # TrainableTokensWrapper.adapter_state_dict (peft/utils/other.py)
PEFT_TIED_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES: the names PEFT ties by


def _scale(state: ModuleState, c: float) -> ModuleState:
    if ROWS in state.tensors:  # trainable_token_indices rows: E[idx] + c(new − E[idx])
        return scale_mix(state, c)
    # DoRA: m(c) = ‖W‖_row + c(m − ‖W‖_row); the row norm needs W, so the mix is applied in weight().
    return state.with_scalars(scaling=c * state.scalars["scaling"], magnitude_mix=c * state.scalars.get("magnitude_mix", 1.0))


class LoRA(AdapterFamily):
    name = "LoRA"
    peft_types = ("LORA",)
    tokens = (*LORA_TOKENS, TOKEN_ROWS)
    knobs = ("scaling",)
    schemes = {
        "linear": Scheme(
            "linear",
            "scale → c·scale (DoRA also m → ‖W‖ + c(m − ‖W‖); trainable tokens E[idx] + c(new − E[idx]))",
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
        modules, _, _ = split_keys(tensors, self.tokens)
        rslora = bool(config.get("use_rslora", False))
        states = []
        for path, params in modules.items():
            if TOKEN_ROWS in params:
                states.append(token_state(path, params.pop(TOKEN_ROWS), _token_indices(config, path)))
            if not params or not _loaded_by_peft(config, path):
                continue
            embedding = "lora_embedding_A" in params
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            require(params, path, a_name, b_name)
            if embedding and "lora_magnitude_vector" in params:
                raise UnsupportedAdapterError(f"{path}: DoRA on an embedding layer is not supported yet.")
            rank = params[a_name].shape[0]
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            if "lora_magnitude_vector" in params:
                params["lora_magnitude_vector"] = params["lora_magnitude_vector"].reshape(-1)
            states.append(
                ModuleState(
                    path,
                    params,
                    {"scaling": scaling},
                    layer="embedding" if embedding else "linear",
                    fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and not embedding,
                )
            )
        return states

    def knob_names(self):
        return (*LORA_TOKENS, *self.knobs)  # token rows are a replacement: knobs leave them as trained

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
        expected = (a.shape[1], b.shape[0]) if state.layer == "embedding" else (b.shape[0], a.shape[1])
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
        a, b = _factors(state)
        left, right = (a.T, b.T) if state.layer == "embedding" else (b, a)
        merged = torch.addmm(weight, left, right, alpha=state.scalars["scaling"])
        if "lora_magnitude_vector" not in state.tensors:
            return merged
        magnitude = _magnitude(state, weight)
        return (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged

    def low_rank(self, state, shape):
        """ΔW = s·B A (embedding: s·(B_e A_e)ᵀ), in weight()'s orientation; DoRA's row norms make it full rank,
        and trainable-token rows are no product of factors."""
        if "lora_magnitude_vector" in state.tensors or ROWS in state.tensors:
            return None
        a, b = _factors(state)
        scaling = state.scalars["scaling"]
        return (scaling * a.T, b.T) if state.layer == "embedding" else (scaling * b, a)

    def changes_bias(self, state):
        return "lora_B.bias" in state.tensors

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
            if layer.lora_B[adapter].bias is not None:
                tensors["lora_B.bias"] = layer.lora_B[adapter].bias
            if adapter in layer.lora_magnitude_vector:
                tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].weight
        kind = "embedding" if "lora_embedding_A" in tensors else "linear"
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return ModuleState(path, tensors, {"scaling": layer.scaling[adapter]}, layer=kind)

    def set_live_state(self, layer, adapter, state):
        if ROWS in state.tensors:
            return set_live_token_state(layer, adapter, state)
        layer.scaling[adapter] = state.scalars["scaling"]
        params = {
            "lora_embedding_A": lambda: layer.lora_embedding_A[adapter],
            "lora_embedding_B": lambda: layer.lora_embedding_B[adapter],
            "lora_A": lambda: layer.lora_A[adapter].weight,
            "lora_B": lambda: layer.lora_B[adapter].weight,
            "lora_B.bias": lambda: layer.lora_B[adapter].bias,
        }
        for name, value in state.tensors.items():
            if name in params:
                params[name]().data.copy_(value)
        if "lora_magnitude_vector" in state.tensors:
            weight = layer.get_base_layer().weight.detach().float()
            dora = layer.lora_magnitude_vector[adapter]
            dora.weight.data.copy_(_magnitude(state, weight.T if layer.fan_in_fan_out else weight))
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


def _factors(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    if state.layer == "embedding":
        return state.tensors["lora_embedding_A"], state.tensors["lora_embedding_B"]
    return state.tensors["lora_A"], state.tensors["lora_B"]


def _magnitude(state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
    """DoRA magnitude at the state's mix: m(c) = ‖W‖_row + c(m − ‖W‖_row), exactly m at c = 1."""
    return toward(torch.linalg.norm(weight, dim=1), state.tensors["lora_magnitude_vector"], state.scalars.get("magnitude_mix", 1.0))
