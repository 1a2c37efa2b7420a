"""MiSS (and its predecessor Bone): one trained block M shared across W's input chunks.

PEFT forward (peft/tuners/miss/layer.py, MissLinear.forward / get_delta_weight); `init_weights` selects
the formula, not only the init:
  default  M (r, out):  y = W x + b + (Σ_k x_k) M over r-sized input chunks x_k (x zero-padded to a multiple
           of r), i.e. ΔW[o, j] = M[j mod r, o]
  "mini"   M (r, mini_r): the same with M tiled to (r, out) (M.repeat(1, out/mini_r))
  "bat"    M (out/r, r, r): every r×r block W_{o,i} of W becomes W_{o,i} + W_{o,i} M_o + M_o (ΔW depends on W)
Bone (removed from PEFT; huggingface/peft src/peft/tuners/bone/layer.py) stored `bone_block` and computed
the default and "bat" forms identically; its checkpoints are read as MiSS.
Every form is linear in M, so M → c·M gives W + c·ΔW.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, shape_error, split_keys

BLOCK = "miss_block"
BONE_BLOCK = "bone_block"


def _scale(state: ModuleState, c: float) -> ModuleState:
    return state.with_tensors(miss_block=c * state.tensors[BLOCK])


class MiSS(AdapterFamily):
    name = "MiSS"
    peft_types = ("MISS", "BONE")
    composes_additively = False  # PEFT applies several of them one after another
    tokens = (BLOCK, BONE_BLOCK)
    schemes = {
        "linear": Scheme(
            "linear",
            "M → c·M",
            "0: base · 1: trained · −1: W − ΔW (bat: ΔW = W M + M per block)",
            _scale,
        ),
    }

    def knob_names(self) -> tuple[str, ...]:
        return (BLOCK,)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        mode = config.get("init_weights", True)
        return [_state(path, params, mode, config.get("mini_r")) for path, params in modules.items()]

    def check_shapes(self, state, weight_shape, bias_shape):
        out_features, in_features = weight_shape
        block = state.tensors[BLOCK]
        if block.dim() == 3:
            size = block.shape[-1]
            if out_features % size or in_features % size or block.shape[0] * size != out_features:
                what = "weight shape (bat: miss_block (out/r, r, r) tiles W in r×r blocks)"
                expected = f"({block.shape[0] * size}, a multiple of {size})"
                raise shape_error(state.path, what, expected, tuple(weight_shape))
            return
        width = int(state.scalars.get("mini_r", out_features))
        if block.shape[1] != width or out_features % width:
            raise shape_error(state.path, "output features (width of miss_block)", block.shape[1], out_features)
        if block.shape[0] > in_features:
            what = "input features (at least the rank r of miss_block)"
            raise shape_error(state.path, what, f"≥ {block.shape[0]}", in_features)

    def weight(self, state, weight):
        block = state.tensors[BLOCK]
        if block.dim() == 3:
            return _bat(weight, block)
        out_features, in_features = weight.shape
        tiled = block.repeat(1, out_features // block.shape[1])  # mini: (r, mini_r) → (r, out); default: unchanged
        chunk_position = torch.arange(in_features, device=block.device) % block.shape[0]
        return weight + tiled[chunk_position].T

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        scalars = {"mini_r": float(layer.miss_mini_r[adapter])} if layer.miss_fn == "mini" else {}
        return ModuleState(path, {BLOCK: layer.miss_block[adapter].detach().clone()}, scalars)

    def set_live_state(self, layer, adapter, state):
        layer.miss_block[adapter].data.copy_(state.tensors[BLOCK])


def _state(path: str, params: dict[str, torch.Tensor], mode: object, mini_r: object) -> ModuleState:
    if (BLOCK in params) == (BONE_BLOCK in params):
        raise AdapterError(f"Adapter module {path} must store exactly one of {BLOCK} (MiSS) or {BONE_BLOCK} (Bone).")
    block = params.get(BLOCK, params.get(BONE_BLOCK))
    expected_dims = 3 if mode == "bat" else 2
    if block.dim() != expected_dims:
        raise AdapterError(
            f"MiSS module {path}: init_weights={mode!r} needs a {expected_dims}-D block but the file stores shape "
            f"{tuple(block.shape)}; adapter_config.json does not match the weights."
        )
    scalars = {"mini_r": float(mini_r)} if mode == "mini" else {}
    return ModuleState(path, {BLOCK: block}, scalars)


def _bat(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W + W_b M + M per r×r block (MissLinear.get_delta_weight), block (o, i) using M[o]."""
    out_features, in_features = weight.shape
    size = block.shape[-1]
    blocks = weight.reshape(out_features // size, size, in_features // size, size).permute(0, 2, 1, 3)
    delta = blocks @ block[:, None] + block[:, None]
    return weight + delta.permute(0, 2, 1, 3).reshape(out_features, in_features)
