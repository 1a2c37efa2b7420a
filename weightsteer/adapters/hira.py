"""HiRA: a Hadamard (elementwise) high-rank update, W ⊙ (B A).

PEFT forward (peft/tuners/hira/layer.py, Linear.forward / _merge):
  Linear     y = W x + b + (W ⊙ B A) x,     so W' = W ⊙ (1 + B A)       (hira_B: out × r, hira_A: r × in)
  Embedding  e = E[t] + (E ⊙ (B_e A_e)ᵀ)[t], so E' = E ⊙ (1 + (B_e A_e)ᵀ)  (hira_embedding_B: dim × r, _A: r × vocab)
For Conv1D PEFT compares transpose(W) with B A, i.e. the same Linear orientation. The change is linear
in B (its no-op value 0), so the linear scheme is B → c·B. The bias is untouched.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedAdapterError
from .base import ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

LINEAR_NAMES = ("hira_A", "hira_B")
EMBEDDING_NAMES = ("hira_embedding_A", "hira_embedding_B")


class HiRA(TensorDictFamily):
    name = "HiRA"
    peft_types = ("HIRA",)
    tokens = (*LINEAR_NAMES, *EMBEDDING_NAMES)
    schemes = {
        "linear": Scheme(
            "linear", "B → c·B", "0: base · 1: trained · −1: W ⊙ (1 − BA)", scale_tensors("hira_B", "hira_embedding_B")
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            embedding = "hira_embedding_A" in params
            require(params, path, *(EMBEDDING_NAMES if embedding else LINEAR_NAMES))
            if params[EMBEDDING_NAMES[0] if embedding else "hira_A"].dim() != 2:
                raise UnsupportedAdapterError(
                    f"HiRA module {path} adapts a convolution; weightsteer merges HiRA into Linear, Conv1D and Embedding layers."
                )
            layer = "embedding" if embedding else "linear"
            states.append(ModuleState(path, params, layer=layer, fan_in_fan_out=fan_in_fan_out and not embedding))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        expected = tuple(_modulation(state).shape)
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        return weight + weight * _modulation(state)


def _modulation(state: ModuleState) -> torch.Tensor:
    """B A in the weight's orientation (embedding: (B_e A_e)ᵀ, vocab × dim)."""
    if state.layer == "embedding":
        return (state.tensors["hira_embedding_B"] @ state.tensors["hira_embedding_A"]).T
    return state.tensors["hira_B"] @ state.tensors["hira_A"]
