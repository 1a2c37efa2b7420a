"""Activation steering vectors baked as biases: "add c·v to the residual stream after block L" is exactly a
bias c·v on the last projection that writes into block L's residual (its output goes straight into the
block's last residual add), wherever the architecture's config can declare that bias, so that transformers,
vLLM and llama.cpp load it. Elsewhere the merge is refused with the reason, and `weightsteer export-vector`
(a llama.cpp control vector) is offered instead.

Placement per architecture, from transformers 5.24 modeling code (reference: steering-formats.md §5). Baked
biases act on every position, padding too (repeng masks left padding): outputs match on unpadded input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..adapters.base import AdapterFamily, ModuleState, Scheme, shape_error
from ..errors import AdapterError, UnsupportedAdapterError
from .base import Artefact

EXPORT_HINT = "Use it at runtime instead, e.g. `weightsteer export-vector VECTOR -o vector.gguf --coeff C` for llama.cpp."
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
POST_NORM = ("gemma2", "gemma3", "gemma3_text", "olmo2")
MOE = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmoe", "dbrx", "phimoe",
    "granitemoe", "jamba", "llama4", "qwen3_next", "minimax",
)  # fmt: skip
NO_BIAS = ("mistral", "ministral", "qwen2", "qwen3", "gemma", "phi3", "cohere", "cohere2", "stablelm", "olmo", "glm", "glm4")


@dataclass(frozen=True)
class Placement:
    """Where one architecture's block-L output bias lives, and what its config must declare to load it."""

    template: str  # module path of the projection, with {layer}
    scale: float = 1.0  # bias = scale·v (Granite multiplies the MLP output by residual_multiplier)
    config_patch: dict = field(default_factory=dict)
    zero_biases: tuple[str, ...] = ()  # other projections whose bias the patch declares (written as zeros)


def placement(config: Mapping[str, object]) -> Placement:
    """The bias placement for a base config, or UnsupportedAdapterError saying why a vector cannot be baked."""
    model_type = str(config.get("model_type", "?"))
    if model_type in ("llama", "smollm3", "granite"):
        scale = 1.0 / float(config.get("residual_multiplier", 1.0)) if model_type == "granite" else 1.0
        declared = bool(config.get("mlp_bias"))
        return Placement(
            "model.layers.{layer}.mlp.down_proj",
            scale,
            {} if declared else {"mlp_bias": True},
            () if declared else ("model.layers.{layer}.mlp.gate_proj", "model.layers.{layer}.mlp.up_proj"),
        )
    if model_type == "gpt2":
        return Placement("transformer.h.{layer}.mlp.c_proj")
    if model_type == "gpt_neox":
        return Placement("gpt_neox.layers.{layer}.mlp.dense_4h_to_h")
    if model_type == "phi":
        return Placement("model.layers.{layer}.mlp.fc2")
    if model_type == "opt":
        if not config.get("do_layer_norm_before", True):
            raise _refusal(model_type, "its blocks are post-LN (do_layer_norm_before: false): a final LayerNorm sits after the residual add")
        if not config.get("enable_bias", True):
            raise _refusal(model_type, "its config has enable_bias: false, and turning it on declares every linear bias")
        return Placement("model.decoder.layers.{layer}.fc2")
    if model_type in POST_NORM:
        raise _refusal(model_type, "its blocks normalise the MLP output before the residual add (post-FFN norm), so no bias adds v after the block")
    if model_type in MOE or config.get("num_local_experts") or config.get("num_experts"):
        raise _refusal(model_type, "its MLP is a mixture of experts: a bias on the experts adds v times the sum of the routing gates")
    if model_type in NO_BIAS:
        raise _refusal(model_type, "its MLP down projection is built with bias=False, and no config key turns it on")
    if model_type == "falcon":
        raise _refusal(model_type, "its bias switch (bias: true) declares every linear's bias and llama.cpp's Falcon loads none")
    raise _refusal(model_type, "weightsteer does not know where this architecture's blocks write into the residual stream")


def _refusal(model_type: str, reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"Cannot bake a steering vector into a {model_type} model: {reason}. {EXPORT_HINT}")


def layer_count(config: Mapping[str, object]) -> int | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def block_index(layer: int, n_layers: int | None, what: str) -> int:
    """A vector's block index, 0-based; negative counts from the end (steering-vectors' convention)."""
    if layer < 0 and n_layers is not None:
        layer += n_layers
    if layer < 0 or (n_layers is not None and layer >= n_layers):
        raise AdapterError(f"{what}: block {layer} does not exist in a base with {n_layers} blocks.")
    return layer


def _add_bias(state: ModuleState, c: float) -> ModuleState:
    return state.with_scalars(strength=c * state.scalars["strength"])


class ResidualBias(AdapterFamily):
    """bias += strength·v on block L's output projection; the weight is untouched."""

    name = "activation vector"
    peft_types = ()
    tokens = ("vector",)
    schemes = {
        "linear": Scheme(
            "linear",
            "b_L → b_L + c·s·v_L on block L's output projection (a new zero bias where the base has none)",
            "0: base (new biases all zero) · 1: the vector at its strength · −1: the vector subtracted",
            _add_bias,
        )
    }

    def parse(self, config, tensors, base_shapes, options):
        where = placement(base_shapes.config)
        n_layers = layer_count(base_shapes.config)
        strength = float(config.get("strength", 1.0)) * where.scale
        vectors: dict[int, torch.Tensor] = {}
        for key, vector in tensors.items():
            layer = block_index(int(key.removeprefix("layer.")), n_layers, f"{config.get('source', 'vector')} {key}")
            if layer in vectors:
                raise AdapterError(f"Two vectors for block {layer} ({key}); pass one vector per block.")
            vectors[layer] = vector
        states = [ModuleState(where.template.format(layer=L), {"vector": v}, {"strength": strength}) for L, v in sorted(vectors.items())]
        if where.config_patch:  # every bias the patched config declares must exist: zeros where no vector lands
            blocks = range(n_layers or 0)
            zero = [where.template.format(layer=L) for L in blocks if L not in vectors]
            zero += [t.format(layer=L) for t in where.zero_biases for L in blocks]
            states += [ModuleState(path, {"vector": torch.zeros(_rows(base_shapes, path))}, {"strength": 0.0}) for path in zero]
        return states

    def weight(self, state, weight):
        return weight

    def bias(self, state, bias):
        return bias + state.scalars["strength"] * state.tensors["vector"]

    def changes_bias(self, state):
        return True

    def changes_weight(self, state):
        return False

    def adds_bias(self, state):
        return True

    def check_shapes(self, state, weight_shape, bias_shape):
        d = state.tensors["vector"].shape[0]
        if d != weight_shape[0]:
            raise shape_error(state.path, "vector length vs the projection's output size", d, weight_shape[0])

    def tied_head_follows(self, config):
        return False


def _rows(base_shapes, path: str) -> int:
    shape = base_shapes.weight(path)
    if shape is None:
        raise AdapterError(f"The base has no {path}.weight; is it the model the vector was made for?")
    return shape[0]


RESIDUAL_BIAS = ResidualBias()


@dataclass
class VectorArtefact(Artefact):
    """Per-block vectors (tensors "layer.L", fp32) at a strength; the config patch comes from the base's architecture."""

    def config_patch(self, base_config):
        return dict(placement(base_config).config_patch)

    def directions(self) -> dict[int, torch.Tensor]:
        """Block index → strength·v (what a runtime adds at coeff 1), before any block-index resolution."""
        strength = float(self.config.get("strength", 1.0))
        return {int(k.removeprefix("layer.")): strength * v for k, v in self.tensors.items()}


def vector_artefact(fmt, path, vectors: Mapping[int, torch.Tensor], *, strength: float = 1.0, **config) -> VectorArtefact:
    tensors = {}
    for layer, vector in vectors.items():
        vector = torch.as_tensor(vector).detach().cpu().float()
        if vector.dim() != 1:
            raise AdapterError(f"{fmt.name} vector for block {layer} has shape {tuple(vector.shape)}; a steering vector is 1-D.")
        if not torch.isfinite(vector).all():
            raise AdapterError(f"{fmt.name} vector for block {layer} contains NaN or inf.")
        tensors[f"layer.{int(layer)}"] = vector
    if not tensors:
        raise AdapterError(f"{path}: the {fmt.name} vector holds no block vectors.")
    merged = {"strength": strength, "source": fmt.name, **config}
    return VectorArtefact(path, merged, RESIDUAL_BIAS, tensors, fmt.name)
