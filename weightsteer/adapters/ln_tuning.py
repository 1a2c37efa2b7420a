"""LN Tuning: the adapter stores a full trained copy of each targeted module's parameters.

PEFT forward (peft/tuners/ln_tuning/layer.py, LNTuningLayer.forward): the layer runs
`ln_tuning_layers[adapter](x)`, a deepcopy of the base module whose parameters were trained; PEFT's
merge swaps the two modules. So at strength 1 every parameter is replaced: p(1) = p₁. Nothing in
the copy is a strength knob, so coeff interpolates each stored tensor from the base value:
  p(c) = p₀ + c·(p₁ − p₀)
held as a scalar `mix` (= c under the linear scheme) that weight() and bias() apply to the base.
Any module type can be targeted (norms, also Linear); parameters are mixed elementwise, so the
stored orientation needs no transposing; on a GPT-2 Conv1D, which the merge hands over in Linear orientation
(state.fan_in_fan_out), the stored copy is transposed to match.
"""

from __future__ import annotations

import re


from ..errors import UnsupportedAdapterError
from .base import MODEL_PREFIX, AdapterFamily, ModuleState, Scheme, require, scale_mix, shape_error, split_keys, toward

TOKEN = "ln_tuning_layers"
BIAS = TOKEN + ".bias"
MERGEABLE_PARAMS = ("weight", "bias")
_COPY_KEY = re.compile(rf"^{re.escape(MODEL_PREFIX)}(?P<path>.+?)\.{TOKEN}\.(?P<param>.+)$")


class LNTuning(AdapterFamily):
    name = "LN Tuning"
    peft_types = ("LN_TUNING",)
    tokens = (TOKEN,)
    schemes = {
        "linear": Scheme(
            "linear",
            "p → p₀ + c·(p₁ − p₀) for every stored parameter",
            "0: base · 1: trained · −1: base − (p₁ − p₀)",
            scale_mix,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        _refuse_other_params(tensors)
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, TOKEN)
            states.append(ModuleState(path, params, {"mix": 1.0}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        trained = tuple(_trained_weight(state).shape)
        if tuple(weight_shape) != trained:
            raise shape_error(state.path, "weight shape", trained, tuple(weight_shape))
        if BIAS in state.tensors and tuple(state.tensors[BIAS].shape) != bias_shape:
            raise shape_error(state.path, "bias shape", tuple(state.tensors[BIAS].shape), bias_shape or "no bias")

    def weight(self, state, weight):
        return toward(weight, _trained_weight(state), state.scalars["mix"])

    def changes_bias(self, state):
        return BIAS in state.tensors

    def bias(self, state, bias):
        return toward(bias, state.tensors[BIAS], state.scalars["mix"]) if BIAS in state.tensors else bias

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        copy = layer.ln_tuning_layers[adapter]
        tensors = {_state_name(name): p.detach().clone() for name, p in copy.named_parameters()}
        return ModuleState(path, tensors, {"mix": 1.0})

    def set_live_state(self, layer, adapter, state):
        """Write p₀ + mix·(p₁ − p₀) into the live copy, p₀ read from the live base module."""
        base = dict(layer.get_base_layer().named_parameters())
        for name, p in layer.ln_tuning_layers[adapter].named_parameters():
            p.data.copy_(toward(base[name].detach().float(), state.tensors[_state_name(name)], state.scalars["mix"]))


def _trained_weight(state: ModuleState):
    """The trained weight in the orientation weight() receives (Linear orientation for a Conv1D)."""
    return state.tensors[TOKEN].T if state.fan_in_fan_out else state.tensors[TOKEN]


def _state_name(param: str) -> str:
    """The state's name for a parameter of the copy, as split_keys names it ("ln_tuning_layers[.bias]")."""
    return TOKEN if param == "weight" else f"{TOKEN}.{param}"


def _refuse_other_params(tensors) -> None:
    """Only weight and bias map onto base tensors of the same name; refuse buffers and nested modules."""
    for key in tensors:
        match = _COPY_KEY.match(key)
        if match and match["param"] not in MERGEABLE_PARAMS:
            raise UnsupportedAdapterError(
                f"LN Tuning adapter tensor {key!r}: the tuned copy of {match['path']} holds {match['param']!r}, "
                "but weightsteer merges only a targeted module's own weight and bias. Target the leaf modules "
                "(e.g. the norm layers) instead of a block that contains them."
            )
