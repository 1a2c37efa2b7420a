"""LoRA: plain, rsLoRA, rank/alpha patterns, lora_bias, embedding LoRA and DoRA.

PEFT forward (peft/tuners/lora/layer.py):
  Linear     y = W x + b + s·B A x (+ s·b_B with lora_bias),  s = α/r or α/√r (rsLoRA)
  Embedding  e = E[t] + s·B_e A_e[:, t]   (both sides times embed_scale, so it factors out)
  DoRA       y = diag(m / ‖W + sBA‖_row)(W + sBA) x + b
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterError, UnsupportedAdapterError
from .base import AdapterFamily, ModuleState, Scheme, pattern_value, require, shape_error, split_keys

RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _scale(state: ModuleState, c: float) -> ModuleState:
    # DoRA: m(c) = ‖W‖_row + c(m − ‖W‖_row); the row norm needs W, so the mix is applied in weight().
    return state.with_scalars(scaling=c * state.scalars["scaling"], magnitude_mix=c * state.scalars.get("magnitude_mix", 1.0))


class LoRA(AdapterFamily):
    name = "LoRA"
    peft_types = ("LORA",)
    tokens = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    knobs = ("scaling",)
    schemes = {
        "linear": Scheme(
            "linear",
            "scale → c·scale (DoRA also m → ‖W‖ + c(m − ‖W‖))",
            "0: base · 1: trained · −1: W − sBA (DoRA: not an inverse)",
            _scale,
        ),
    }

    def parse(self, config, tensors, base_shapes, options):
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
            raise AdapterError(
                f"This LoRA was initialised with {init!r}, which moves the adapter's starting value out of the base "
                "weights; it only reproduces the fine-tune on that modified (residual) base. Convert it to an "
                "ordinary LoRA with PEFT: `model.save_pretrained(out, path_initial_model_for_weight_conversion="
                "<folder saved right after init>)`, then merge the converted adapter."
            )
        modules, _, _ = split_keys(tensors, self.tokens)
        rslora = bool(config.get("use_rslora", False))
        states = []
        for path, params in modules.items():
            embedding = "lora_embedding_A" in params
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            require(params, path, a_name, b_name)
            if embedding and "lora_magnitude_vector" in params:
                raise UnsupportedAdapterError(f"{path}: DoRA on an embedding layer is not supported yet.")
            rank = params[a_name].shape[0]
            alpha = pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            if "lora_magnitude_vector" in params:
                params["lora_magnitude_vector"] = params["lora_magnitude_vector"].reshape(-1)
            states.append(
                ModuleState(
                    path,
                    params,
                    {"scaling": scaling},
                    layer="embedding" if embedding else "linear",
                    fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and not embedding,
                )
            )
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        a, b = _factors(state)
        expected = (a.shape[1], b.shape[0]) if state.layer == "embedding" else (b.shape[0], a.shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))
        if "lora_B.bias" in state.tensors and bias_shape is None:
            raise AdapterError(
                f"LoRA adapter at {state.path} trains a bias (lora_bias=True) but the base layer has none; a merged "
                "checkpoint would need a new bias tensor the architecture cannot load."
            )

    def weight(self, state, weight):
        a, b = _factors(state)
        delta = state.scalars["scaling"] * (b @ a)
        merged = weight + (delta.T if state.layer == "embedding" else delta)
        if "lora_magnitude_vector" not in state.tensors:
            return merged
        magnitude = _magnitude(state, weight)
        return (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged

    def changes_bias(self, state):
        return "lora_B.bias" in state.tensors

    def bias(self, state, bias):
        if "lora_B.bias" not in state.tensors:
            return bias
        return bias + state.scalars["scaling"] * state.tensors["lora_B.bias"]

    # ---- runtime ---------------------------------------------------------------------------------
    def live_state(self, layer, adapter, path):
        if adapter in layer.lora_embedding_A:
            tensors = {"lora_embedding_A": layer.lora_embedding_A[adapter], "lora_embedding_B": layer.lora_embedding_B[adapter]}
        else:
            tensors = {"lora_A": layer.lora_A[adapter].weight, "lora_B": layer.lora_B[adapter].weight}
            if layer.lora_B[adapter].bias is not None:
                tensors["lora_B.bias"] = layer.lora_B[adapter].bias
            if adapter in layer.lora_magnitude_vector:
                tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].weight
        kind = "embedding" if "lora_embedding_A" in tensors else "linear"
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return ModuleState(path, tensors, {"scaling": layer.scaling[adapter]}, layer=kind)

    def set_live_state(self, layer, adapter, state):
        layer.scaling[adapter] = state.scalars["scaling"]
        params = {
            "lora_embedding_A": lambda: layer.lora_embedding_A[adapter],
            "lora_embedding_B": lambda: layer.lora_embedding_B[adapter],
            "lora_A": lambda: layer.lora_A[adapter].weight,
            "lora_B": lambda: layer.lora_B[adapter].weight,
            "lora_B.bias": lambda: layer.lora_B[adapter].bias,
        }
        for name, value in state.tensors.items():
            if name in params:
                params[name]().data.copy_(value)
        if "lora_magnitude_vector" in state.tensors:
            weight = layer.get_base_layer().weight.detach().float()
            dora = layer.lora_magnitude_vector[adapter]
            dora.weight.data.copy_(_magnitude(state, weight.T if layer.fan_in_fan_out else weight))
            dora._cache_clear()


def _factors(state: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    if state.layer == "embedding":
        return state.tensors["lora_embedding_A"], state.tensors["lora_embedding_B"]
    return state.tensors["lora_A"], state.tensors["lora_B"]


def _magnitude(state: ModuleState, weight: torch.Tensor) -> torch.Tensor:
    """DoRA magnitude at the state's mix: m(c) = ‖W‖_row + c(m − ‖W‖_row), exactly m at c = 1."""
    trained = state.tensors["lora_magnitude_vector"]
    mix = state.scalars.get("magnitude_mix", 1.0)
    if mix == 1.0:
        return trained
    base_norm = torch.linalg.norm(weight, dim=1)
    return base_norm + mix * (trained - base_norm)
