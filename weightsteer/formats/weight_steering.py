"""weight-steering dense deltas (wassname/weight-steering, src/ws/steer.py): `w.pt`, a torch.save of a plain
dict {HF state_dict key: ΔW} (τ⁺ − τ⁻), no metadata. Applied as `p.data.add_(w.to(p.dtype), alpha=α)` over
`dict(model.named_parameters())`, which lists a tied parameter once: a tied model's `lm_head.weight` key is
skipped, not added twice. Baked: W + c·ΔW (c = α). Loaded with torch.load(weights_only=True) only.
Runtime twin: weight-steering's own `weight_steer(model, w, alpha=c)` (it edits the weights in place).
"""

from __future__ import annotations

import pickle

import torch

from ..adapters.base import ModuleState
from ..errors import AdapterError
from .base import Format
from .deltas import DenseDelta

FILE_NAME = "w.pt"
HEAD = "lm_head"


class WeightSteeringDelta(DenseDelta):
    name = "weight-steering ΔW"

    def parse(self, config, tensors, base_shapes, options):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, delta in tensors.items():
            path, _, kind = key.rpartition(".")
            if kind not in ("weight", "bias"):
                raise AdapterError(f"weight-steering delta {key!r} is not a weight or bias; weightsteer merges parameters only.")
            if path == HEAD and base_shapes.weight(HEAD) is None:
                continue  # tied head: named_parameters() lists it once, as the embedding
            modules.setdefault(path, {})["delta" if kind == "weight" else "delta.bias"] = delta
        return [ModuleState(path, params, {"scaling": 1.0}) for path, params in modules.items()]


class WeightSteering(Format):
    name = "weight-steering"
    summary = "weight-steering w.pt: {parameter name: dense ΔW}, applied as W + α·ΔW"
    family = WeightSteeringDelta()
    runtime = "weight-steering: weight_steer(model, w, alpha=c) (in place)"

    def detect(self, path):
        return (path / FILE_NAME).is_file() if path.is_dir() else path.name.endswith(".pt") and path.is_file()

    def read(self, path):
        file = path / FILE_NAME if path.is_dir() else path
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise AdapterError(
                f"{file} cannot be loaded with torch.load(weights_only=True) ({str(e).splitlines()[0]}); weightsteer does "
                "not unpickle code. Re-save it as a plain dict of tensors."
            ) from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            raise AdapterError(f"{file} is not a dict of parameter name → tensor (a weight-steering w.pt).")
        for key, tensor in loaded.items():
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{file}: delta {key!r} contains NaN or inf.")
        return self.artefact(file, {}, {k: v.float() for k, v in loaded.items()})

