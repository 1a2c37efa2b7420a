"""LoHa: a Hadamard product of two low-rank matrices.

PEFT forward (peft/tuners/loha/layer.py, Linear._get_delta_activations / make_weight):
  y = W x + b + ΔW x,   ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b)
with hada_w1_a, hada_w2_a (out, r) and hada_w1_b, hada_w2_b (r, in) stored under bare names. r and α
come from r / rank_pattern and alpha / alpha_pattern (loha/model.py, first matching key). PEFT rejects
Conv1D for LoHa; its conv variants (hada_t1/hada_t2) are not merged here. rank_dropout and
module_dropout act in training only.
"""

from __future__ import annotations

from .base import ModuleState, pattern_value, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily, check_configured_rank, require_matrix

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(ScaledDeltaFamily):
    name = "LoHa"
    peft_types = ("LOHA",)
    conv_only = ("hada_t1", "hada_t2")
    tokens = (*FACTORS, *conv_only)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, *FACTORS)
            r = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8))
            for name in ("hada_w1_b", "hada_w2_b"):
                check_configured_rank(path, r, name, params[name].shape[0])
            states.append(ModuleState(path, params, {"scaling": alpha / r}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        require_matrix(self.name, state.path, weight_shape)
        w1a, w1b, w2a, w2b = (state.tensors[n] for n in FACTORS)
        expected = (w1a.shape[0], w1b.shape[1])
        if tuple(weight_shape) != expected or (w2a.shape[0], w2b.shape[1]) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        w1a, w1b, w2a, w2b = (state.tensors[n] for n in FACTORS)
        return weight + ((w1a @ w1b) * (w2a @ w2b)) * state.scalars["scaling"]

    def low_rank(self, state, shape):
        """(W1a W1b) ⊙ (W2a W2b) = Σ_ij (w1a_i ⊙ w2a_j)(w1b_i ⊙ w2b_j)ᵀ: rank r1·r2 (Khatri–Rao)."""
        w1a, w1b, w2a, w2b = (state.tensors[n] for n in FACTORS)
        left = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
        right = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
        return state.scalars["scaling"] * left, right
