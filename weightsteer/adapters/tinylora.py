"""TinyLoRA: LoRA-XS on frozen SVD factors of W, with the r × r core a combination of fixed random matrices.

PEFT forward (peft/tuners/tinylora/layer.py, TinyLoraLayer._compute_R / Linear.forward / Embedding.forward):
  R = Σ_i v[i] P[i]   (P: u × r × r, N(0, 1/r) from seed projection_seed + layer index),
  y = W x + b + B R A x      (A = √S_r V_rᵀ, B = U_r √S_r, both saved;  embedding: E' = E + B R A)
v (length u) is shared by a group of layers (weight_tying) and saved once at base_model.tinylora_v.<group>;
the group follows from the layer's index among the targeted modules (peft/tuners/tinylora/model.py),
recovered here from its saved P. ΔW is linear in v (no-op 0): the linear scheme is v → c·v.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .base import LowRankChange, ModuleState, Scheme, require, scale_tensors, shape_error, split_keys
from .scaled_delta import TensorDictFamily

FACTORS = ("tinylora_A", "tinylora_B", "tinylora_P")
VECTOR = "tinylora_v"


class TinyLoRA(LowRankChange, TensorDictFamily):
    name = "TinyLoRA"
    peft_types = ("TINYLORA",)
    tokens = FACTORS
    shared_tokens = (VECTOR,)
    schemes = {"linear": Scheme("linear", "v → c·v", "0: base · 1: trained · −1: W − B R A", scale_tensors(VECTOR))}

    def knob_names(self):
        return (VECTOR,)

    def refusal(self, config):
        if not config.get("save_projection", True):
            return (
                "it was saved without its projections (save_projection=False). PEFT regenerates them from "
                "projection_seed and each layer's index in the model's module order, which a merge from the checkpoint "
                "alone does not know. Re-save it with save_projection=True."
            )
        return None

    def parse(self, config, tensors, base_shapes, options):
        modules, _, shared = split_keys(tensors, self.tokens, self.shared_tokens)
        groups = _groups(config, modules)
        states = []
        for path, params in modules.items():
            require(params, path, *FACTORS)  # tinylora_P too: saved with save_projection=True
            key = f"{VECTOR}.{groups[path]}"
            if key not in shared:
                raise AdapterError(
                    f"TinyLoRA module {path} uses the shared vector {key}, which the adapter file lacks."
                )
            layer = "embedding" if path.endswith(("embed_tokens", "wte", "word_embeddings", "embed_in")) else "linear"
            state_tensors = {**params, VECTOR: shared[key]}
            states.append(
                ModuleState(
                    path,
                    state_tensors,
                    layer=layer,
                    fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and layer == "linear",
                )
            )
        return states

    def check_shapes(self, state, weight_shape, bias_shape):
        expected = (state.tensors["tinylora_B"].shape[0], state.tensors["tinylora_A"].shape[1])
        if tuple(weight_shape) != expected:
            raise shape_error(state.path, "weight shape", expected, tuple(weight_shape))


    def low_rank(self, state, shape):
        t = state.tensors
        core = torch.einsum("i,ijk->jk", t[VECTOR], t["tinylora_P"])
        return t["tinylora_B"] @ core, t["tinylora_A"]

    # ---- runtime: v lives in the model-level ParameterDict layer.tinylora_v[adapter][group] ----------------
    def live_state(self, layer, adapter, path):
        state = super().live_state(layer, adapter, path)
        state.tensors[VECTOR] = layer.tinylora_v[adapter][layer._tinylora_v_key[adapter]].detach().clone()
        return state

    def set_live_state(self, layer, adapter, state):
        layer.tinylora_v[adapter][layer._tinylora_v_key[adapter]].data.copy_(state.tensors[VECTOR])


def _groups(config: dict, modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """Each module's v group: TinyLoraModel._create_and_replace with its layer index, found by matching the saved
    P to torch.normal(0, 1/√r, generator seeded with projection_seed + index)."""
    seed = int(config.get("projection_seed", 42))
    count = len(modules)
    num_groups = max(1, round(count * (1.0 - float(config.get("weight_tying", 0.0)))))
    group_size = max(1, count // num_groups)
    groups = {}
    for path, params in modules.items():
        index = _layer_index(params["tinylora_P"], seed, count, path)
        groups[path] = str(min(index // group_size, num_groups - 1))
    return groups


def _layer_index(projection: torch.Tensor, seed: int, count: int, path: str) -> int:
    u, r, _ = projection.shape
    for index in range(count):
        drawn = torch.normal(
            mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=torch.Generator().manual_seed(seed + index)
        )
        if torch.allclose(drawn, projection, atol=1e-2 / r**0.5, rtol=0):  # saved in a half dtype: compare loosely
            return index
    raise AdapterError(
        f"TinyLoRA module {path}: its saved projection matches no seed projection_seed + i (i < {count}); the "
        "adapter's projection_seed or its set of adapted modules differs from the config saved with it."
    )
