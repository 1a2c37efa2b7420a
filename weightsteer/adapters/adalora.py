"""AdaLoRA: an SVD-shaped LoRA, B diag(E) A, whose ranks are pruned during training.

PEFT forward (peft/tuners/adalora/layer.py, SVDLinear.forward / get_delta_weight):
  y = W x + b + α' / (ranknum + 1e-5) · B diag(E) A x
with lora_A (r', in), lora_E (r', 1), lora_B (out, r') stored under bare names (ParameterDicts).
ranknum is never saved: it is init_r, also for layers pruned to r' < init_r ranks, because
AdaLoraModel.resize_modules_by_rank_pattern copies the old ranknum back after resizing.
α' = lora_alpha, or the layer's rank r' when lora_alpha ≤ 0 (update_layer, called with the kept rank
on resize). Pruned tensors are saved already truncated; rank_pattern maps "<path>.lora_E" to the mask.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import LowRankChange, ModuleState, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily, require_matrix

RANKNUM_EPSILON = 1e-5  # ranknum + 1e-5 in SVDLinear.forward


class AdaLoRA(LowRankChange, ScaledDeltaFamily):
    name = "AdaLoRA"
    peft_types = ("ADALORA",)
    tokens = ("lora_A", "lora_E", "lora_B")

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        init_r = int(config.get("init_r", 12))
        lora_alpha = config.get("lora_alpha", 8)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            require(params, path, *self.tokens)
            rank = params["lora_A"].shape[0]
            _check_kept_rank(config, path, rank, init_r)
            alpha = lora_alpha if lora_alpha > 0 else float(rank)
            scalars = {"scaling": alpha, "ranknum": float(init_r)}
            states.append(ModuleState(path, params, scalars, fan_in_fan_out=fan_in_fan_out))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        require_matrix(self.name, state.path, weight_shape)
        a, e, b = (state.tensors[n] for n in self.tokens)
        expected = (b.shape[0], a.shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))
        if not (a.shape[0] == e.shape[0] == b.shape[1]):
            raise AdapterError(
                f"AdaLoRA module {state.path}: lora_A has {a.shape[0]} ranks, lora_E {e.shape[0]}, lora_B "
                f"{b.shape[1]}; the adapter file is inconsistent."
            )


    def low_rank(self, state, shape):
        """ΔW = α'/(ranknum + 1e-5) · B (diag(E) A)."""
        a, e, b = (state.tensors[n] for n in self.tokens)
        scale = state.scalars["scaling"] / (state.scalars["ranknum"] + RANKNUM_EPSILON)
        return scale * b, a * e.reshape(-1, 1)

    def live_scalars(self, layer: torch.nn.Module, adapter: str) -> dict[str, float]:
        return {**super().live_scalars(layer, adapter), "ranknum": layer.ranknum[adapter].item()}


def _check_kept_rank(config: dict, path: str, rank: int, init_r: int) -> None:
    """The scale divides by init_r, so init_r and the pruning mask must agree with the saved tensors."""
    mask = (config.get("rank_pattern") or {}).get(f"{path}.lora_E")
    expected = sum(bool(kept) for kept in mask) if mask is not None else init_r
    if rank != expected:
        source = f"rank_pattern keeps {expected} of its ranks" if mask is not None else f"init_r = {init_r}"
        raise AdapterError(
            f"AdaLoRA module {path} stores {rank} ranks but adapter_config.json says {source}. The scale "
            "lora_alpha / init_r depends on the config, so use the adapter_config.json saved with these weights."
        )
