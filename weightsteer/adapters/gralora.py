"""GraLoRA: LoRA split into k × k sub-blocks that exchange rank, plus an optional plain LoRA part.

PEFT forward (peft/tuners/gralora/layer.py, Linear.forward / get_delta_weight):
  x is cut into k input blocks x_n; z_n = x_n A_n (A: k × in/k × r), each z_n cut into k chunks of r/k;
  output block j = Σ_n z_n[chunk j] B_j[chunk n]  (B: k × r × out/k), so block (j, n) of ΔW is
  (A_n[:, chunk j] B_j[chunk n, :])ᵀ; with hybrid_r > 0 also B_g A_g (gralora_B_general/A_general).
  y = W x + b + s·ΔW x,  s = alpha / (r + hybrid_r). Conv1D works in the same Linear orientation.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import ModuleState, require, shape_error, split_keys
from .scaled_delta import ScaledDeltaFamily

BLOCKS = ("gralora_A", "gralora_B")
GENERAL = ("gralora_A_general.weight", "gralora_B_general.weight")


class GraLoRA(ScaledDeltaFamily):
    name = "GraLoRA"
    peft_types = ("GRALORA",)
    tokens = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")
    nested = True

    def knob_names(self):
        return (*BLOCKS, *GENERAL, *self.knobs)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        r, hybrid_r = int(config.get("r", 32)), int(config.get("hybrid_r", 0))
        scaling = config.get("alpha", 64) / (r + hybrid_r)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            require(params, path, *BLOCKS)
            k = params["gralora_A"].shape[0]
            if params["gralora_A"].shape[2] % k:
                raise AdapterError(
                    f"GraLoRA module {path}: rank {params['gralora_A'].shape[2]} is not divisible by gralora_k = {k}; the adapter file is inconsistent."
                )
            states.append(ModuleState(path, params, {"scaling": scaling}, fan_in_fan_out=fan_in_fan_out))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        a, b = state.tensors["gralora_A"], state.tensors["gralora_B"]
        expected = (b.shape[0] * b.shape[2], a.shape[0] * a.shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))

    def weight(self, state, weight):
        return weight + state.scalars["scaling"] * _delta(state)


def _delta(state: ModuleState) -> torch.Tensor:
    a, b = state.tensors["gralora_A"], state.tensors["gralora_B"]
    k, block_in, rank = a.shape
    block_out, sub = b.shape[2], rank // k
    # blocks[j, o, n, i] = Σ_s A[n, i, j·sub + s] · B[j, n·sub + s, o]
    blocks = torch.einsum("nijs,jnso->joni", a.reshape(k, block_in, k, sub), b.reshape(k, k, sub, block_out))
    delta = blocks.reshape(k * block_out, k * block_in)
    if GENERAL[0] in state.tensors:
        delta = delta + state.tensors[GENERAL[1]] @ state.tensors[GENERAL[0]]
    return delta
