"""Peanut: a weight change computed by a small residual network from the base weight itself.

PEFT forward (peft/tuners/peanut/layer.py, Linear._compute_delta_weight):
  h₀ = f(Wᵀ Aᵀ);  h_{i+1} = f(Enc_i h_i) for i < depth (keeping h_i);  then depth decoder steps
  h ← f(Dec_i h) + h_{depth−1−i};  ΔW = s·(h Bᵀ)ᵀ,  y = W x + b + ΔW x,  f = act_fn, s = scaling.
ΔW depends on W but is linear in s (no-op value 0): the linear scheme is s → c·s. nn.Linear only.
"""

from __future__ import annotations

import torch

from .base import ModuleState, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily


class Peanut(ScaledDeltaFamily):
    name = "Peanut"
    peft_types = ("PEANUT",)
    tokens = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")
    nested = True
    live_scalar_names = {"act_fn": "act_fn"}

    def knob_names(self):
        return ("peanut_A.weight", "peanut_B.weight", *self.knobs)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        # act_fn (a name, e.g. "relu") rides along with the scalars: the runtime twin reads it from layer.act_fn.
        scalars = {"scaling": float(config.get("scaling", 1.0)), "act_fn": config.get("act_fn", "relu")}
        for path, params in modules.items():
            require(params, path, "peanut_A.weight", "peanut_B.weight")
        return [ModuleState(path, params, dict(scalars)) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        out_features = state.tensors["peanut_B.weight"].shape[0]
        if out_features != weight_shape[0] or state.tensors["peanut_A.weight"].shape[1] != weight_shape[0]:
            raise shape_error(state.path, "output features (peanut_A / peanut_B)", out_features, weight_shape[0])

    def weight(self, state, weight):
        return weight + state.scalars["scaling"] * _network(state, weight)


def _network(state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
    from transformers.activations import ACT2FN

    act = ACT2FN[state.scalars["act_fn"]]
    t = state.tensors
    depth = sum(1 for n in t if n.startswith("peanut_encoders."))
    h = act(weight.T @ t["peanut_A.weight"].T)
    residuals = []
    for i in range(depth):
        residuals.append(h)
        h = act(h @ t[f"peanut_encoders.{i}.weight"].T)
    for i in range(depth):
        h = act(h @ t[f"peanut_decoders.{i}.weight"].T) + residuals[depth - 1 - i]
    return (h @ t["peanut_B.weight"].T).T
