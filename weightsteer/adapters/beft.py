"""BEFT: a trained bias offset per adapted Linear layer; the weight is untouched.

PEFT forward (peft/tuners/beft/layer.py, Linear.forward / merge): y = W x + b + beft_bias, so b' = b + beft_bias
(beft_bias is stored 1 × out). PEFT merges it only into a layer that has a bias. The change is linear in
beft_bias (no-op value 0): the linear scheme is beft_bias → c·beft_bias.
"""

from __future__ import annotations

from ..errors import AdapterError
from .base import ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

BIAS = "beft_bias"


class BEFT(TensorDictFamily):
    name = "BEFT"
    peft_types = ("BEFT",)
    tokens = (BIAS,)
    schemes = {
        "linear": Scheme("linear", "beft_bias → c·beft_bias", "0: base · 1: trained · −1: b − Δb", scale_tensors(BIAS))
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        for path, params in modules.items():
            require(params, path, BIAS)
        return [ModuleState(path, params) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        if bias_shape is None:
            raise AdapterError(
                f"BEFT module {state.path} trains a bias offset but the base layer has no bias, so there is no tensor "
                "to add it to (PEFT cannot merge it either). Target layers that have a bias."
            )
        size = state.tensors[BIAS].numel()
        if (size,) != tuple(bias_shape):
            raise shape_error(state.path, "bias shape", (size,), tuple(bias_shape))

    def weight(self, state, weight):
        return weight

    def changes_weight(self, state):
        return False

    def changes_bias(self, state):
        return True

    def bias(self, state, bias):
        return bias + state.tensors[BIAS].reshape(-1)
