"""steering-vectors `SteeringVector` objects: `layer_activations` {layer index: Tensor (d,)}, `layer_type`.

`vector.apply(model, multiplier=m)` adds m·v in place to the matched layer's output at every position
(steering_vector.py); the layer index is the position in the matched list (`model.layers.{num}`,
`transformer.h.{num}`, `gpt_neox.layers.{num}`), negative from the end. A "decoder_block" vector is added
after block L, an "mlp" vector to block L's MLP output: both are a bias on the MLP's output projection.
Not bakeable: other layer types, a custom operator, token masks (apply() arguments). Runtime twin:
`vector.apply(model, multiplier=c)`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedAdapterError
from .base import Format
from .vectors import EXPORT_HINT, RESIDUAL_BIAS, vector_artefact

BAKEABLE_LAYER_TYPES = ("decoder_block", "mlp")


class SteeringVectors(Format):
    name = "steering-vectors"
    summary = "steering-vectors SteeringVector objects (Python), layer_type decoder_block or mlp"
    family = RESIDUAL_BIAS
    runtime = "steering-vectors: with vector.apply(model, multiplier=c): ..."

    def detect_object(self, obj):
        return hasattr(obj, "layer_activations") and hasattr(obj, "layer_type")

    def from_object(self, obj):
        if obj.layer_type not in BAKEABLE_LAYER_TYPES:
            raise UnsupportedAdapterError(
                f"Cannot bake a steering-vectors vector of layer_type {obj.layer_type!r}: only the output of a decoder "
                f"block or of its MLP ({', '.join(BAKEABLE_LAYER_TYPES)}) is a bias on one projection. {EXPORT_HINT}"
            )
        return vector_artefact(self, Path(f"<steering-vectors SteeringVector {obj.layer_type}>"), dict(obj.layer_activations))
