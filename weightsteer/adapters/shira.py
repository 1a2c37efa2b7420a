"""SHiRA: a sparse update, trained values at fixed (row, column) positions of W.

PEFT forward (peft/tuners/shira/layer.py, Linear.get_delta_weight / forward):
  W' = W + sparse_coo(indices, w·scale, (out, in)),   y = W' x + b
`scale` is layer.scaling[adapter] (1 unless changed with set_scale). Indices are int32 on disk, or
float32 when saved on Windows (peft/tuners/shira/model.py); either way they are positions. Repeated
positions add up, as in a COO tensor.
"""

from __future__ import annotations

from ..errors import AdapterError
from .base import AdapterFamily, ModuleState, Scheme, require, scale_scaling, shape_error, split_keys

WEIGHT, INDICES = "shira_weight", "shira_indices"



class SHiRA(AdapterFamily):
    name = "SHiRA"
    peft_types = ("SHIRA",)
    tokens = (WEIGHT, INDICES)
    knobs = ("scaling",)
    schemes = {
        "linear": Scheme(
            "linear",
            "scale → c·scale",
            "0: base · 1: trained · −1: W − ΔW",
            scale_scaling,
        ),
    }

    def knob_names(self) -> tuple[str, ...]:
        return (WEIGHT, *self.knobs)

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, WEIGHT, INDICES)
            indices = params[INDICES].long()
            if indices.dim() != 2 or indices.shape != (2, params[WEIGHT].numel()):
                count = params[WEIGHT].numel()
                raise AdapterError(
                    f"SHiRA module {path}: shira_indices has shape {tuple(params[INDICES].shape)} but shira_weight "
                    f"has {count} values; expected (2, {count}). The adapter file is inconsistent."
                )
            states.append(ModuleState(path, {WEIGHT: params[WEIGHT], INDICES: indices}, {"scaling": 1.0}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        indices = state.tensors[INDICES]
        if indices.numel() == 0:
            return
        needed = tuple(int(i) + 1 for i in indices.max(dim=1).values)
        if indices.min() < 0 or needed[0] > weight_shape[0] or needed[1] > weight_shape[1]:
            what = "weight shape (positions in shira_indices)"
            raise shape_error(state.path, what, f"at least {needed}", tuple(weight_shape))

    def weight(self, state, weight):
        rows, cols = state.tensors[INDICES]
        values = state.tensors[WEIGHT] * state.scalars["scaling"]
        return weight.index_put((rows, cols), values, accumulate=True)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {WEIGHT: layer.shira_weight[adapter].detach().clone(), INDICES: layer.shira_indices[adapter].long()}
        return ModuleState(path, tensors, {"scaling": layer.scaling[adapter]})

    def set_live_state(self, layer, adapter, state):
        layer.set_scale(adapter, state.scalars["scaling"])
        layer.shira_weight[adapter].data.copy_(state.tensors[WEIGHT])
