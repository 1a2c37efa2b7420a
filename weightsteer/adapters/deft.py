"""DeFT (and PaRa): remove a learned subspace of W's output space and inject a trained one.

PEFT forward (peft/tuners/deft/layer.py, DeftLinear.forward / get_delta_weight):
  relu: Q = P, right = relu(P);   qr: Q = qr(P).Q, right = Q     (P: out × r, r capped at out)
  W' = W + Q (s·R − rightᵀ W),    s = alpha / r (1 without alpha);  PaRa (para=True): W' = W − Q rightᵀ W
The change depends on W. Its no-op is R = rightᵀW / s (PaRa is DeFT with R = 0), so the linear scheme moves
R from there: R(c) = rightᵀW/s + c·(R − rightᵀW/s), which gives W + c·ΔW; held as `mix` = c, applied
where W is known. Conv1D works in the same Linear orientation.
"""

from __future__ import annotations

import torch

from .base import AdapterFamily, ModuleState, Scheme, require, scale_mix, shape_error, split_keys, toward

P, R = "deft_P", "deft_R"


class DeFT(AdapterFamily):
    name = "DeFT"
    peft_types = ("DEFT",)
    tokens = (P, R)
    schemes = {
        "linear": Scheme(
            "linear",
            "R → rᵀW/s + c·(R − rᵀW/s) (PaRa: R = 0)",
            "0: base · 1: trained · −1: W − ΔW",
            scale_mix,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        states = []
        for path, params in modules.items():
            para = bool(config.get("para", False))
            require(params, path, P, *(() if para else (R,)))
            rank = params[P].shape[1]
            scalars = {
                "scaling": config["alpha"] / rank if config.get("alpha") else 1.0,
                "decomposition": config.get("decomposition_method", "relu"),
                "para": para,
                "mix": 1.0,
            }
            states.append(ModuleState(path, params, scalars, fan_in_fan_out=fan_in_fan_out))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        out_features = state.tensors[P].shape[0]
        if out_features != weight_shape[0]:
            raise shape_error(state.path, "output features (deft_P)", out_features, weight_shape[0])
        if R in state.tensors and state.tensors[R].shape[1] != weight_shape[1]:
            raise shape_error(state.path, "input features (deft_R)", state.tensors[R].shape[1], weight_shape[1])

    def weight(self, state, weight):
        q, removed = _removed(state, weight)
        return weight + q @ (state.scalars["scaling"] * _injection(state, removed) - removed)

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        tensors = {P: layer.deft_P[adapter].detach().clone()}
        if adapter in layer.deft_R:
            tensors[R] = layer.deft_R[adapter].detach().clone()
        scalars = {
            "scaling": layer.deft_scaling[adapter],
            "decomposition": layer.deft_decomposition[adapter],
            "para": layer.deft_para[adapter],
            "mix": 1.0,
        }
        return ModuleState(path, tensors, scalars, fan_in_fan_out=layer.fan_in_fan_out)

    def set_live_state(self, layer, adapter, state):
        """Write R(mix) into the live layer; PaRa runs as DeFT with that R until restored (mix = 1)."""
        layer.deft_P[adapter].data.copy_(state.tensors[P])
        if state.scalars["para"] and state.scalars["mix"] == 1.0:
            layer.deft_para[adapter] = True
            if adapter in layer.deft_R:
                del layer.deft_R[adapter]
            return
        base = layer.get_base_layer().weight.detach().float()
        _, removed = _removed(state, base.T if layer.fan_in_fan_out else base)
        injection = _injection(state, removed)
        if adapter in layer.deft_R:
            layer.deft_R[adapter].data.copy_(injection)
        else:
            layer.deft_R[adapter] = torch.nn.Parameter(injection, requires_grad=False)
        layer.deft_para[adapter] = False


def _removed(state: ModuleState, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, rightᵀ W) as DeftLinear._project and _merge_factor compute them (fp32)."""
    p = state.tensors[P].float()
    if state.scalars["decomposition"] == "qr":
        q = torch.linalg.qr(p).Q
        right = q
    else:
        q, right = p, torch.relu(p)
    return q, right.T @ weight


def _injection(state: ModuleState, removed: torch.Tensor) -> torch.Tensor:
    """R at the state's mix: rᵀW/s + mix·(R − rᵀW/s), R = 0 for PaRa; exactly R at mix = 1."""
    identity = removed / state.scalars["scaling"]
    trained = torch.zeros_like(identity) if state.scalars["para"] else state.tensors[R]
    return toward(identity, trained, state.scalars["mix"])
