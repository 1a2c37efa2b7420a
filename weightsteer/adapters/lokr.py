"""LoKr: a Kronecker product of two factors, each stored whole or as a low-rank product.

PEFT forward (peft/tuners/lokr/layer.py, get_delta_weight / make_kron):
  y = W x + b + ΔW x,   ΔW = (α/r)·kron(W1, W2),   W1 = lokr_w1 or lokr_w1_a lokr_w1_b, W2 likewise
W1 is (a, c), W2 (b, d) with out = a·b, in = c·d. Which factors are split depends on r, decompose_both
and decompose_factor, but the saved tensors say which form was used. The scale uses the configured r
(r / rank_pattern) even when both factors are whole matrices, so r cannot come from the shapes.
rank_dropout (and its rank_dropout_scale) and module_dropout act in training only. PEFT rejects Conv1D
for LoKr; its conv variants are not merged here.
"""

from __future__ import annotations

import torch

from .base import ModuleState, pattern_value, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily, check_configured_rank, require_matrix

SIDES = ("lokr_w1", "lokr_w2")


class LoKr(ScaledDeltaFamily):
    name = "LoKr"
    peft_types = ("LOKR",)
    conv_only = ("lokr_t2",)
    tokens = (*(name for side in SIDES for name in (side, f"{side}_a", f"{side}_b")), *conv_only)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            r = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8))
            for side in SIDES:
                if side not in params:
                    require(params, path, f"{side}_a", f"{side}_b")
                    check_configured_rank(path, r, f"{side}_b", params[f"{side}_b"].shape[0])
            states.append(ModuleState(path, params, {"scaling": alpha / r}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        require_matrix(self.name, state.path, weight_shape)
        (a, c), (b, d) = (_factor_shape(state.tensors, side) for side in SIDES)
        expected = (a * b, c * d)
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape (that of kron(W1, W2))", expected, tuple(weight_shape))

    def weight(self, state, weight):
        w1, w2 = (_factor(state.tensors, side) for side in SIDES)
        return weight + torch.kron(w1, w2) * state.scalars["scaling"]


def _factor(tensors: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    return tensors[side] if side in tensors else tensors[f"{side}_a"] @ tensors[f"{side}_b"]


def _factor_shape(tensors: dict[str, torch.Tensor], side: str) -> tuple[int, int]:
    if side in tensors:
        return tuple(tensors[side].shape)
    return tensors[f"{side}_a"].shape[0], tensors[f"{side}_b"].shape[-1]
