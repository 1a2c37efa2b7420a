"""llama.cpp control vectors: a GGUF holding one F32 1-D tensor `direction.N` per block (as repeng's
`export_gguf` writes it: architecture "controlvector", KV controlvector.model_hint / layer_count).

llama.cpp (common/common.cpp common_control_vector_load_one, src/llama-adapter.cpp) reads only the
`direction.N` tensors and adds strength·direction.N right after block N's FFN residual add (N 0-based, as
repeng's keys); N ≤ 0 makes it reject the whole file, N ≥ n_layer is silently unused. Merging bakes
direction.N after block N for every N ≥ 0 (repeng's reading). Runtime twin: `llama-cli --control-vector-scaled
FILE c` on the base's GGUF. `export_vector` writes any bakeable vector in this format, coeff folded in.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError, ExportError, OutputError
from .base import Format
from .vectors import RESIDUAL_BIAS, VectorArtefact, layer_count, vector_artefact

ARCH = "controlvector"
DIRECTION = re.compile(r"^direction\.(?P<layer>-?\d+)$")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise AdapterError("Reading and writing control-vector GGUF files needs the gguf package: pip install gguf") from e
    return gguf


class ControlVectorGGUF(Format):
    name = "control-vector-gguf"
    summary = "llama.cpp control-vector GGUF (direction.N tensors, e.g. from repeng's export_gguf)"
    family = RESIDUAL_BIAS
    runtime = "llama.cpp: --control-vector-scaled FILE c"

    def detect(self, path):
        if not (path.is_file() and path.suffix == ".gguf"):
            return False
        try:
            reader = _gguf().GGUFReader(str(path))
        except Exception:
            return False
        return bool(reader.tensors) and all(DIRECTION.match(t.name) for t in reader.tensors)

    def read(self, path):
        gguf = _gguf()
        reader = gguf.GGUFReader(str(path))
        vectors = {}
        for tensor in reader.tensors:
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
                raise AdapterError(f"{path}: {tensor.name} is not a 1-D F32 tensor; llama.cpp would reject this control vector.")
            vectors[int(DIRECTION.match(tensor.name)["layer"])] = np.array(tensor.data, dtype=np.float32)
        return vector_artefact(self, path, vectors, model_hint=_string(reader, f"{ARCH}.model_hint"))


def _string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode(errors="replace")


@dataclass
class VectorExport:
    path: Path
    coeff: float
    source: str
    layers: list[int]
    model_hint: str | None

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}

    def summary(self) -> str:
        return (
            f"wrote {self.path}  ({self.source} at coeff {self.coeff:g} as a llama.cpp control vector, "
            f"direction.N for blocks {', '.join(map(str, self.layers))}; use: --control-vector FILE or --control-vector-scaled FILE s)"
        )


def export_vector(
    vector: object, output: str | os.PathLike, *, coeff: float = 1.0, base: str | os.PathLike | None = None, overwrite: bool = False
) -> VectorExport:
    """Write a steering vector (file or object any vector format reads) as a llama.cpp control-vector GGUF with
    direction.N = coeff·v_N (F32) for the vector after block N. With `base`, check d and the block count."""
    from ..merge import finite_coeff
    from . import load_artefact

    coeff = finite_coeff(coeff)
    output = Path(output)
    _check_target(output, overwrite)
    loaded = load_artefact(vector)
    if not isinstance(loaded, VectorArtefact):
        raise ExportError(f"{vector} is a {loaded.peft_type} adapter, not an activation steering vector; use export-lora.")
    directions = loaded.directions()
    if base is not None:
        directions = _checked_against(directions, base)
    if 0 in directions or any(n < 0 for n in directions):
        raise ExportError(
            "The vector steers the output of block 0 (or a negative block index without --base): llama.cpp reads "
            "direction.N for blocks N ≥ 1 and rejects a file holding direction.0. Bake it with `weightsteer merge` instead."
        )
    _write(output, {n: coeff * v for n, v in sorted(directions.items())}, loaded.config.get("model_hint"))
    return VectorExport(output, coeff, loaded.peft_type, sorted(directions), loaded.config.get("model_hint"))


def _check_target(output: Path, overwrite: bool) -> None:
    if output.exists() and (output.is_dir() or not overwrite):
        raise OutputError(f"{output} exists already; pass --overwrite (overwrite=True) to replace it.")
    if not output.parent.is_dir():
        raise OutputError(f"The parent folder of {output} does not exist.")


def _checked_against(directions, base) -> dict:
    from ..checkpoint import Checkpoint
    from ..resolve import resolve
    from .vectors import block_index

    config = Checkpoint(resolve(str(base), "base")).config
    n_layers = layer_count(config)
    width = next((config[k] for k in HIDDEN_SIZE_KEYS if isinstance(config.get(k), int)), None)
    checked = {}
    for layer, v in directions.items():
        if width is not None and v.shape[0] != width:
            raise ExportError(f"The vector for block {layer} has {v.shape[0]} entries but the base's hidden size is {width}.")
        checked[block_index(layer, n_layers, f"vector for block {layer}")] = v
    return checked


def _write(output: Path, directions, model_hint: str | None) -> None:
    gguf = _gguf()
    partial = output.with_name(f".{output.name}.partial")
    writer = gguf.GGUFWriter(str(partial), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint or "")
    writer.add_uint32(f"{ARCH}.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v.float().numpy().astype(np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(output)
