"""GLoRA: generalised LoRA, W' = W + W ⊙ A + B and b' = b + b ⊙ D + E + W C.

PEFT forward (peft/tuners/glora/layer.py, GloraLinear.forward / GloraLayer.merge):
  y = (W + W ⊙ A + B) x + (b + b ⊙ D + E + W C)
Each of A..E is a "path" (GloraLoraPath Xd Xu, GloraVectorPath X, GloraScalarPath X[0], or empty = 0);
C, D, E exist only on layers with a bias. Every term is linear in one path with no-op value 0, so the
linear scheme scales each path by c (Xd of a LoRA path, X otherwise). The W C bias term needs the base
weight while the bias is merged, which the streaming merge does not give a bias, so a trained C is refused.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedAdapterError
from .base import ModuleState, Scheme, shape_error, split_keys
from .scaled_delta import TensorDictFamily

PATHS = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")


def _scale_paths(state: ModuleState, c: float) -> ModuleState:
    return state.with_tensors(**{n: c * t for n, t in state.tensors.items() if n.endswith((".Xd", ".X"))})


class GLoRA(TensorDictFamily):
    name = "GLoRA"
    peft_types = ("GLORA",)
    tokens = PATHS
    nested = True
    schemes = {
        "linear": Scheme(
            "linear", "every path A…E → c·path", "0: base · 1: trained · −1: W − W⊙A − B (bias likewise)", _scale_paths
        ),
    }

    def knob_names(self):
        return ()  # a path's tensors depend on its parametrisation (Xd/Xu or X); `linear` scales them all

    def parse(self, config, tensors, base_shapes, options):
        modules, _, _ = split_keys(tensors, self.tokens, nested=self.nested)
        states = []
        for path, params in modules.items():
            if "glora_C.Xd" in params or "glora_C.X" in params:
                raise UnsupportedAdapterError(
                    f"GLoRA module {path} trains the weight-to-bias path C (config_C={config.get('config_C')!r}): "
                    "b' = b + W·C needs the base weight while merging the bias, which weightsteer does not support "
                    "yet. Adapters trained with config_C='none' (or on layers without a bias) merge."
                )
            states.append(ModuleState(path, {n: t for n, t in params.items() if not n.endswith(".zeros")}))
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        for name in ("glora_A", "glora_B"):
            value = _path(state, name)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] != weight_shape[0]:
                raise shape_error(state.path, f"output features ({name})", value.shape[0], weight_shape[0])

    def weight(self, state, weight):
        return weight + weight * _path(state, "glora_A") + _path(state, "glora_B")

    def changes_bias(self, state):
        return any(n.startswith(("glora_D", "glora_E")) for n in state.tensors)

    def bias(self, state, bias):
        return bias + bias * _path(state, "glora_D") + _path(state, "glora_E")


def _path(state: ModuleState, name: str) -> torch.Tensor | float:
    """The value GloraPath.forward() returns: Xd Xu, X, X[0] for a scalar path, 0 for an empty one."""
    tensors = state.tensors
    if f"{name}.Xd" in tensors:
        return tensors[f"{name}.Xd"] @ tensors[f"{name}.Xu"]
    value = tensors.get(f"{name}.X")
    if value is None:
        return 0.0
    return value[0] if value.shape == (1,) else value
