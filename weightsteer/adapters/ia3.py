"""(IA)³: one learned vector per layer that rescales either its outputs or its inputs.

PEFT forward (peft/tuners/ia3/layer.py, Linear.forward):
  output placement   ia3_l (out, 1):  y = l ⊙ (W x + b)   →  W' = diag(l) W,  b' = l ⊙ b
  feed-forward       ia3_l (1, in):   y = W (l ⊙ x) + b   →  W' = W diag(l),  b' = b
The stored shape says which placement a module has (IA3Layer.update_layer creates (1, in) exactly for
`feedforward_modules`). In Linear orientation both closed forms are the broadcast product W * l.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError, SchemeError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, linear_from, require, shape_error, split_keys

TOKEN = "ia3_l"


def _linear(state: ModuleState, c: float) -> ModuleState:
    """l(c) = 1 + c(l − 1): c = 0 gives l = 1 (the base), c = 1 the trained vector."""
    return state.with_tensors(**{TOKEN: linear_from(1.0, c, state.tensors[TOKEN])})


def _power(state: ModuleState, c: float) -> ModuleState:
    """l(c) = l^c, the one-parameter group through diag(l): l(−1) undoes the adapter exactly."""
    scale = state.tensors[TOKEN]
    if not float(c).is_integer() and bool((scale <= 0).any()):
        raise SchemeError(
            f"IA3 module {state.path}: ia3_l has {int((scale <= 0).sum())} entries ≤ 0, which have no real power "
            f"{c:g}. Use an integer coeff or --scheme linear."
        )
    if c < 0 and bool((scale == 0).any()):
        raise SchemeError(
            f"IA3 module {state.path}: ia3_l has entries equal to 0, so the layer cannot be inverted (coeff {c:g}). "
            "Use coeff ≥ 0 or --scheme linear."
        )
    return state.with_tensors(**{TOKEN: scale.pow(c)})


class IA3(AdapterFamily):
    name = "IA3"
    peft_types = ("IA3",)
    composes_additively = False  # PEFT applies several of them one after another
    tokens = (TOKEN,)
    schemes = {
        "linear": Scheme(
            "linear",
            "l → 1 + c(l − 1)",
            "0: base · 1: trained · −1: l → 2 − l (not an inverse)",
            _linear,
        ),
        "power": Scheme(
            "power",
            "l → l^c",
            "0: base · 1: trained · −1: exact inverse 1/l (fractional c needs l > 0)",
            _power,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        states = []
        for path, params in modules.items():
            require(params, path, TOKEN)
            if params[TOKEN].dim() != 2:
                raise UnsupportedAdapterError(
                    f"IA3 module {path}: ia3_l has shape {tuple(params[TOKEN].shape)}; IA3 on Conv2d/Conv3d layers "
                    "is not supported, only Linear and Conv1D."
                )
            transposed = _stored_transposed(config, base_shapes.weight(path), params[TOKEN])
            states.append(ModuleState(path, {TOKEN: params[TOKEN]}, fan_in_fan_out=transposed))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        scale = state.tensors[TOKEN]
        if len(weight_shape) != 2:
            raise AdapterError(f"IA3 module {state.path}: the base weight has shape {weight_shape}, expected a 2-D matrix.")
        if _feedforward(scale):
            if scale.shape[1] != weight_shape[1]:
                raise shape_error(state.path, "input features (length of feed-forward ia3_l)", scale.shape[1], weight_shape[1])
        elif scale.shape[0] != weight_shape[0]:
            raise shape_error(state.path, "output features (length of ia3_l)", scale.shape[0], weight_shape[0])

    def weight(self, state, weight):
        # (out, 1) scales rows = diag(l) W; (1, in) scales columns = W diag(l).
        return weight * state.tensors[TOKEN]

    def changes_bias(self, state):
        return not _feedforward(state.tensors[TOKEN])

    def bias(self, state, bias):
        if _feedforward(state.tensors[TOKEN]):
            return bias
        return bias * state.tensors[TOKEN].reshape(bias.shape)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        return ModuleState(path, {TOKEN: layer.ia3_l[adapter].detach().clone()}, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        layer.ia3_l[adapter].data.copy_(state.tensors[TOKEN])


def _feedforward(scale: torch.Tensor) -> bool:
    """(1, in) is the feed-forward (input) placement, (out, 1) the output placement."""
    return scale.shape[0] == 1 and scale.shape[1] != 1


def _stored_transposed(config: dict, stored_shape: tuple[int, ...] | None, scale: torch.Tensor) -> bool:
    """Is the base weight stored in × out (Conv1D)? PEFT decides per layer (Conv1D forces fan_in_fan_out=True,
    Linear forces False, ia3/model.py `_create_new_module`) but saves only the last layer's value in the config,
    so a GPT-2 adapter that also wraps the Linear lm_head says False. A non-square base weight tells directly."""
    configured = bool(config.get("fan_in_fan_out", False))
    if stored_shape is None or len(stored_shape) != 2 or stored_shape[0] == stored_shape[1]:
        return configured
    features, linear_axis = (scale.shape[1], 1) if _feedforward(scale) else (scale.shape[0], 0)
    if stored_shape[linear_axis] == features:
        return False
    return stored_shape[1 - linear_axis] == features or configured
