"""repeng `ControlVector` objects (vgel/repeng): `directions` {block index: float32 array (d,)} and `model_type`.

`ControlModel.set_control(vector, coeff)` adds coeff·directions[L] to block L's returned hidden state
(repeng/control.py); keys are 0-based block indices (training reads hidden_states[L + 1]). Baked: bias
c·v_L (weightsteer.formats.vectors). Runtime twin: `ControlModel(model, layer_ids).set_control(vector, c)`.
`normalize=True` and a custom `operator` are arguments of set_control, not part of the vector: they make the
change input-dependent and cannot be baked; pass only vectors you run with the default `+`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Format
from .vectors import RESIDUAL_BIAS, vector_artefact


class Repeng(Format):
    name = "repeng"
    summary = "repeng ControlVector objects (Python): directions added after block L"
    family = RESIDUAL_BIAS
    runtime = "repeng: ControlModel(model, layers).set_control(vector, coeff=c)"

    def detect_object(self, obj):
        return hasattr(obj, "directions") and hasattr(obj, "model_type") and isinstance(obj.directions, dict)

    def from_object(self, obj):
        vectors = {layer: np.asarray(v, dtype=np.float32) for layer, v in obj.directions.items()}
        return vector_artefact(self, Path(f"<repeng ControlVector {obj.model_type}>"), vectors, model_hint=obj.model_type)
