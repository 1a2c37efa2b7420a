"""repeng `ControlVector` objects (vgel/repeng): `directions` {block index: float32 array (d,)} and `model_type`;
and a `ControlModel` as currently set (its wrapped blocks' `params`: control, normalize, operator).

`ControlModel.set_control(vector, coeff)` adds coeff·directions[L] to block L's returned hidden state
(repeng/control.py ControlModule.forward); keys are 0-based block indices (training reads hidden_states[L + 1]).
Baked: bias c·v_L (weightsteer.formats.vectors); a ControlModel's controls already hold their coeff, so c = 1 is
the model as set. Runtime twin: `ControlModel(model, layer_ids).set_control(vector, c)`. `normalize=True` rescales
each token to its pre-control norm and a custom `operator` replaces +: both depend on the input and are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UnsupportedAdapterError
from .base import Format
from .vectors import EXPORT_HINT, RESIDUAL_BIAS, vector_artefact


class Repeng(Format):
    name = "repeng"
    summary = "repeng ControlVector objects (Python): directions added after block L"
    family = RESIDUAL_BIAS
    runtime = "repeng: ControlModel(model, layers).set_control(vector, coeff=c)"

    def detect_object(self, obj):
        vector = hasattr(obj, "directions") and hasattr(obj, "model_type") and isinstance(obj.directions, dict)
        return vector or _is_control_model(obj)

    def from_object(self, obj):
        if _is_control_model(obj):
            return self._from_control_model(obj)
        vectors = {layer: np.asarray(v, dtype=np.float32) for layer, v in obj.directions.items()}
        return vector_artefact(self, Path(f"<repeng ControlVector {obj.model_type}>"), vectors, model_hint=obj.model_type)

    def _from_control_model(self, control_model):
        layers = _layers(control_model.model)
        vectors = {}
        for layer in control_model.layer_ids:
            params = layers[layer].params
            if params.control is None:
                continue
            if params.normalize or getattr(params.operator, "__qualname__", "") != "BlockControlParams.<lambda>":
                setting = "normalize=True" if params.normalize else "a custom operator"
                raise UnsupportedAdapterError(
                    f"Cannot bake the repeng ControlModel: block {layer} is set with {setting}, which makes the change "
                    f"depend on each token's activations; only the default `current + control` is a bias. {EXPORT_HINT}"
                )
            vectors[layer] = params.control.detach().float().reshape(-1)
        model_type = getattr(control_model.model.config, "model_type", None)
        return vector_artefact(self, Path(f"<repeng ControlModel {model_type}>"), vectors, model_hint=model_type)


def _is_control_model(obj) -> bool:
    return hasattr(obj, "layer_ids") and hasattr(obj, "set_raw_control") and hasattr(obj, "model")


def _layers(model):
    """repeng's model_layer_list: model.model.layers or model.transformer.h (HEAD also reads repeng_layers)."""
    for path in ("repeng_layers", "model.layers", "transformer.h"):
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found
    raise UnsupportedAdapterError(f"Cannot find the blocks of the {type(model).__name__} wrapped by the ControlModel.")
