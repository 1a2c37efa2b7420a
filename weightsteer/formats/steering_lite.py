"""steering-lite saved vectors (wassname/steering-lite `Vector.save`): a safetensors file with keys
`layer{L}.v` (d,) or `layer{L}.V` (k, d) and metadata `cfg` (the JSON SteeringConfig: method, layers, target,
target_submodule, coeff, dtype, ...); or the `Vector` object itself (`cfg` + `state`).

Runtime (attach.py, variants/mean_diff.py, pca.py): a block hook returns y + cfg.coeff·v, with v stored as a
buffer in cfg.dtype (so rounded to e.g. bfloat16 even on an fp32 model) and `V` applied as the sum of its
rows. Bakeable: the additive block-level methods (mean_diff, pca) with target "residual" and no
target_submodule; the others depend on the input. Baked: bias c·cfg.coeff·v(cfg.dtype), so coeff 1 is
`with vector(model):`. Runtime twin: `with vector(model, C=c·cfg.coeff): ...`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint import read_header
from ..errors import AdapterError, UnsupportedAdapterError
from .base import Format
from .vectors import EXPORT_HINT, RESIDUAL_BIAS, vector_artefact

ADDITIVE_METHODS = ("mean_diff", "pca")
KEY = re.compile(r"^layer(?P<layer>\d+)\.(?P<kind>[vV])$")


class SteeringLite(Format):
    name = "steering-lite"
    summary = "steering-lite Vector.save safetensors (layer{L}.v / layer{L}.V + cfg metadata), or the Vector object"
    family = RESIDUAL_BIAS
    runtime = "steering-lite: with vector(model, C=c * vector.cfg.coeff): ..."

    def detect(self, path):
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        try:
            metadata, _ = read_header(path)
        except Exception:
            return False
        return "method" in _json(metadata.get("cfg", "")) if "cfg" in metadata else False

    def read(self, path):
        with safe_open(str(path), framework="pt") as f:
            cfg = _json(f.metadata().get("cfg", ""))
        return self._artefact(path, cfg, _state(load_file(str(path)), path))

    def detect_object(self, obj):
        return hasattr(obj, "cfg") and hasattr(obj, "state") and hasattr(obj.cfg, "method")

    def from_object(self, obj):
        cfg = obj.cfg.to_dict() if hasattr(obj.cfg, "to_dict") else dict(vars(obj.cfg))
        cfg["dtype"] = str(cfg.get("dtype", "bfloat16")).removeprefix("torch.")
        return self._artefact(Path(f"<steering-lite Vector {cfg.get('method')}>"), cfg, obj.state)

    def _artefact(self, path, cfg: dict, state: dict):
        method = cfg.get("method")
        if method not in ADDITIVE_METHODS or cfg.get("target_submodule") is not None or cfg.get("target", "residual") != "residual":
            raise UnsupportedAdapterError(
                f"Cannot bake the steering-lite vector {path}: method {method!r} (target {cfg.get('target')!r}, "
                f"target_submodule {cfg.get('target_submodule')!r}) is not an additive block-output vector; only "
                f"{', '.join(ADDITIVE_METHODS)} on the residual add the same v at every position. {EXPORT_HINT}"
            )
        dtype = getattr(torch, str(cfg.get("dtype", "bfloat16")), None)
        if not isinstance(dtype, torch.dtype):
            raise AdapterError(f"steering-lite vector {path}: unknown cfg dtype {cfg.get('dtype')!r}.")
        vectors = {}
        for layer, tensors in state.items():
            if not isinstance(layer, int):
                raise AdapterError(f"steering-lite vector {path}: state key {layer!r} is not a block index.")
            # The runtime keeps v (V) as a buffer in cfg.dtype (attach._install_state) and adds v (the sum of V's
            # rows) in the model's dtype (variants/pca.py apply): fp32 for the fp32 models this matches.
            rounded = {name: t.to(dtype).float() for name, t in tensors.items()}
            vectors[layer] = rounded["v"] if "v" in rounded else rounded["V"].sum(0)
        return vector_artefact(self, path, vectors, strength=float(cfg.get("coeff", 1.0)), method=method)


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _state(tensors: dict[str, torch.Tensor], path: Path) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"steering-lite vector {path}: key {key!r} is not a block vector (layer<L>.v / layer<L>.V); "
                f"sub-module vectors are not bakeable. {EXPORT_HINT}"
            )
        state.setdefault(int(match["layer"]), {})[match["kind"]] = tensor
    return state
