"""VB-LoRA: LoRA factors assembled from a shared bank of sub-vectors, mixed by top-k softmax logits.

PEFT forward (peft/tuners/vblora/layer.py, Linear._get_lora_matrices / forward):
  mix(z) = Σ_{top-k of z} softmax(top-k logits) · bank[index]              (one length-L sub-vector)
  A = mix(logits_A) (r, in/L, L) → (r, in);  B = mix(logits_B) (out/L, r, L) → (out/L, L, r) → (out, r)
  y = W x + b + B A x,  so W' = W + B A.
With save_only_topk_weights the file holds the top-k indices and the first k−1 softmax weights; PEFT
reloads them as logits log(w) (last w = 1 − Σ) at the indices and −inf elsewhere
(VBLoRAModel._remap_adapter_state_dict_for_load), which is reproduced here.
PEFT has no branch scale, and the bank feeds both A and B (bank·c gives c²·ΔW), so the state carries a
`scale` s: W' = W + s·B A. At runtime s sits in the layer's vblora_dropout slot as a ×s module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, shape_error, split_keys

LOGITS = ("vblora_logits_A", "vblora_logits_B")
TOPK_PARTS = ("_topk_indices", "_topk_weights")
BANK = "vblora_vector_bank"


def _scale(state: ModuleState, c: float) -> ModuleState:
    return state.with_scalars(scale=c * state.scalars["scale"])


class BranchScale(nn.Module):
    """Stands in the vblora_dropout slot: the original dropout module, then ×scale."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


class VBLoRA(AdapterFamily):
    name = "VB-LoRA"
    peft_types = ("VBLORA",)
    tokens = (*LOGITS, *(logits + part for logits in LOGITS for part in TOPK_PARTS))
    shared_tokens = (BANK,)
    schemes = {
        "linear": Scheme(
            "linear",
            "W + c·B A (branch scale; the bank is not scaled, bank·c would give c²)",
            "0: base · 1: trained · −1: W − BA",
            _scale,
        ),
    }

    def knob_names(self) -> tuple[str, ...]:
        return (*LOGITS, BANK)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        if modules and BANK not in shared:
            raise AdapterError(f"VB-LoRA adapter lacks base_model.{BANK}; the adapter file is incomplete.")
        bank = shared.get(BANK)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            logits = {name: _logits(params, path, name, bank) for name in LOGITS}
            states.append(
                ModuleState(
                    path,
                    {**logits, BANK: bank},
                    {"scale": 1.0, "topk": float(config.get("topk", 2))},
                    fan_in_fan_out=fan_in_fan_out,
                )
            )
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        out_features, in_features = weight_shape
        logits_a, logits_b = state.tensors["vblora_logits_A"], state.tensors["vblora_logits_B"]
        num_vectors, length = state.tensors[BANK].shape
        if logits_a.shape[1] * length != in_features:
            what = "input features (vblora_logits_A sub-vectors × vector_length)"
            raise shape_error(state.path, what, logits_a.shape[1] * length, in_features)
        if logits_b.shape[0] * length != out_features:
            what = "output features (vblora_logits_B sub-vectors × vector_length)"
            raise shape_error(state.path, what, logits_b.shape[0] * length, out_features)
        if not logits_a.shape[-1] == logits_b.shape[-1] == num_vectors or logits_a.shape[0] != logits_b.shape[1]:
            raise AdapterError(
                f"VB-LoRA module {state.path}: logits shapes {tuple(logits_a.shape)} (A) and {tuple(logits_b.shape)} "
                f"(B) do not fit a bank of {num_vectors} vectors or each other; the adapter file is inconsistent."
            )

    def weight(self, state, weight):
        bank, topk = state.tensors[BANK], int(state.scalars["topk"])
        logits_a, logits_b = state.tensors["vblora_logits_A"], state.tensors["vblora_logits_B"]
        a = _mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
        b = _mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return weight + state.scalars["scale"] * (b @ a)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {name: getattr(layer, name)[adapter].detach().clone() for name in LOGITS}
        tensors[BANK] = layer.vblora_vector_bank[adapter].detach().clone()
        slot = layer.vblora_dropout[adapter]
        scale = slot.scale if isinstance(slot, BranchScale) else 1.0
        scalars = {"scale": scale, "topk": float(layer.topk[adapter])}
        return ModuleState(path, tensors, scalars, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        for name in (*LOGITS, BANK):
            getattr(layer, name)[adapter].data.copy_(state.tensors[name])
        slot = layer.vblora_dropout[adapter]
        inner = slot.inner if isinstance(slot, BranchScale) else slot
        scale = state.scalars["scale"]
        # At scale 1 the original module goes back in, so restoring is exact.
        layer.vblora_dropout[adapter] = inner if scale == 1.0 else BranchScale(inner, scale)


def _mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Linear._get_low_rank_matrix: softmax over the top-k logits, weighted sum of those bank rows."""
    top_logits, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top_logits, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def _logits(params: dict[str, torch.Tensor], path: str, name: str, bank: torch.Tensor) -> torch.Tensor:
    if name in params:
        return params[name]
    indices_name, weights_name = (name + part for part in TOPK_PARTS)
    require(params, path, indices_name, weights_name)
    indices = params[indices_name].long()
    weights = params[weights_name]
    # The k−1 stored weights plus the last, 1 − Σ; as logits log(w) at the indices, −inf elsewhere.
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    full = torch.full((*weights.shape[:-1], bank.shape[0]), float("-inf"))
    return full.scatter(-1, indices, torch.log(weights))
