"""Super-Tuning: trained values at fixed positions of W, optionally plus a LoRA part ("Supra").

PEFT forward (peft/tuners/supertuning/layer.py, Linear.forward / get_delta_weight):
  W' = W + scatter_add(flat positions `indices`, values) + (α/r)·B A,   y = W' x + b
The positions are the top-k |W| entries (select_top; k = numel·(1 − sparsity)), saved as
supertuning_indices or, with save_precomputed_indices=False, recomputed from the base weight as PEFT
does at load. The change is linear in the values and in B (no-op 0): the linear scheme scales both by c.
nn.Linear only.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

VALUES, INDICES = "supertuning_values", "supertuning_indices"
LORA = ("supertuning_lora_A.weight", "supertuning_lora_B.weight")


class Supertuning(TensorDictFamily):
    name = "Super-Tuning"
    peft_types = ("SUPERTUNING",)
    tokens = (VALUES, INDICES, "supertuning_lora_A", "supertuning_lora_B")
    nested = True
    schemes = {
        "linear": Scheme(
            "linear",
            "values → c·values, B → c·B",
            "0: base · 1: trained · −1: W − ΔW",
            scale_tensors(VALUES, "supertuning_lora_B"),
        ),
    }

    def knob_names(self):
        return (VALUES, *LORA)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        rank = config.get("r")
        alpha = config.get("lora_alpha") or (2 * rank if rank else 0)  # SupertuningConfig: lora_alpha defaults to 2r
        scalars = {"select_top": bool(config.get("select_top", True)), "lora_scaling": alpha / rank if rank else 0.0}
        states = []
        for path, params in modules.items():
            require(params, path, VALUES)
            if INDICES in params:
                params[INDICES] = params[INDICES].long()
            states.append(ModuleState(path, params, dict(scalars)))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        count = state.tensors[VALUES].numel()
        if count > weight_shape[0] * weight_shape[1]:
            raise shape_error(state.path, "weight size", f"at least {count} entries", tuple(weight_shape))
        if LORA[1] in state.tensors and state.tensors[LORA[1]].shape[0] != weight_shape[0]:
            raise shape_error(
                state.path, "output features (supertuning_lora_B)", state.tensors[LORA[1]].shape[0], weight_shape[0]
            )

    def weight(self, state, weight):
        values = state.tensors[VALUES]
        indices = state.tensors.get(INDICES)
        if indices is None:
            indices = _top_positions(weight, values.numel(), state.scalars["select_top"])
        if indices.numel() != values.numel():
            raise AdapterError(
                f"Super-Tuning module {state.path}: {indices.numel()} positions for {values.numel()} values; the adapter file is inconsistent."
            )
        merged = weight.reshape(-1).scatter_add(0, indices.to(weight.device), values).reshape(weight.shape)
        if LORA[0] in state.tensors:
            a, b = (state.tensors[n] for n in LORA)
            merged = merged + state.scalars["lora_scaling"] * (b @ a)
        return merged


def _top_positions(weight: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """SupertuningLayer.update_layer: the flat positions of the `count` largest (or smallest) |W|."""
    return torch.topk(weight.abs().flatten(), k=count, largest=largest).indices
