"""Streaming access to safetensors checkpoints.

`Checkpoint` reads the headers of a (sharded) safetensors checkpoint and hands out one tensor at a
time; `ShardWriter` writes a safetensors file tensor by tensor, so that no shard is ever held in
memory whole. The `safetensors` library only writes complete in-memory dicts, which is why the
writer is ours; the format itself (8-byte little-endian header length, JSON header with data
offsets, raw little-endian data) is small and stable.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BaseModelError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
WEIGHT_FORMATS_REFUSED = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
INDEX_NAME = "model.safetensors.index.json"
_COPY_CHUNK = 1 << 30
# Bytes per write() call. The kernel sizes new page-cache folios by the write: one of many MiB takes 2 MiB
# folios, which on VMs that hand free memory back to their host (free page reporting) are exactly the
# blocks given back, so every page of them faults on the host first. Measured on a 2-core VM writing
# 1.6 GiB after a few idle seconds: 16 MiB writes 5.2 s, 1 MiB 1.3 s, 512 KiB 0.43 s, 64 KiB 0.65-0.79 s.
WRITE_PIECE = 512 << 10
STAGE_PIECE = 32 << 20  # bytes per device-to-host copy of a GPU tensor being written (two in flight)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def dtype_itemsize(code: str) -> int:
    return torch.empty((), dtype=DTYPES[code]).element_size()


MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers too


def read_header(path: Path) -> tuple[dict[str, str], list[TensorInfo]]:
    """Parse and check a safetensors header: (metadata, tensors in file order)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BaseModelError(f"{path}: not a safetensors file (only {len(prefix)} bytes).")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise BaseModelError(
                    f"{path}: the header claims {length} bytes but the file has {size}; it is truncated or not safetensors."
                )
            header = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError) as e:
        raise BaseModelError(f"{path}: not a readable safetensors file ({e}).") from None
    if not isinstance(header, dict):
        raise BaseModelError(f"{path}: the safetensors header is a JSON {json_kind(header)}, not an object.")
    metadata = _checked_metadata(path, header.pop("__metadata__", None))
    data_start, data_size = 8 + length, size - 8 - length
    tensors = [_tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.start)
    return metadata, tensors


def _checked_metadata(path: Path, metadata: object) -> dict[str, str]:
    """safetensors metadata must map strings to strings: the library refuses to load anything else."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise BaseModelError(f"{path}: __metadata__ is a JSON {json_kind(metadata)}, not a string → string map.")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise BaseModelError(
                f"{path}: __metadata__[{key!r}] is {json.dumps(value)}, not a string; safetensors cannot load such a "
                "file. Re-save the checkpoint with string metadata."
            )
    return metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    def bad(what: str) -> BaseModelError:
        return BaseModelError(f"{path}: tensor {name!r} {what}; the file is corrupt or not safetensors.")

    if not isinstance(entry, dict):
        raise bad(f"has a header entry {json.dumps(entry)[:40]} instead of an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has dtype {json.dumps(dtype)}")
    if dtype not in DTYPES:
        raise BaseModelError(f"{path}: tensor {name!r} has dtype {dtype}, which weightsteer does not read.")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"has shape {json.dumps(shape)}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad(f"has data_offsets {json.dumps(offsets)}, not [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"has data_offsets {offsets} outside the {data_size} data bytes")
    if end - begin != _numel(tuple(shape)) * dtype_itemsize(dtype):
        raise bad(f"has {end - begin} data bytes for shape {shape} in {dtype}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def link_roots(root: Path) -> tuple[Path, ...]:
    """Where the files of a model folder may really live: inside it or, for a Hub-cache snapshot
    (…/models--org--name/snapshots/<rev>, whose files are links into …/blobs), in that repository's cache folder."""
    real = Path(os.path.realpath(root))
    if real.parent.name == "snapshots" and "--" in real.parent.parent.name:
        return (real.parent.parent,)
    return (real,)


def contained_file(root: Path, path: Path) -> Path:
    """The real path of a file of the model folder `root`; links may not leave it (see `link_roots`)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BaseModelError(f"{path} is a broken link ({e}); fix or remove it.") from None
    if not any(real == r or r in real.parents for r in link_roots(root)):
        raise BaseModelError(
            f"{path} links to {real}, outside the model folder {root}. weightsteer follows links only within the "
            "model's own folder (or its Hub-cache repository), so that no outside file is copied or published; "
            "copy the file in or remove the link."
        )
    return real


READ_CHUNK = 16 << 20  # bytes per read request of a large tensor


def read_tensor(info: TensorInfo, into: torch.Tensor | None = None, pool: Executor | None = None) -> torch.Tensor:
    """Read one tensor from disk into fresh CPU memory (no mmap kept alive), or into the start of `into`,
    a reusable uint8 buffer (e.g. page-locked, for fast copies to a GPU); the result then aliases it.
    With a thread pool, a large tensor is read as READ_CHUNK pieces, several in flight at once."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8) if into is None else into[: info.nbytes]
    view = memoryview(buffer.numpy())
    pieces = [(offset, min(READ_CHUNK, info.nbytes - offset)) for offset in range(0, info.nbytes, READ_CHUNK)]
    with open(info.file, "rb", buffering=0) as f:
        if pool is None or len(pieces) < 2:
            for offset, length in pieces:
                read_part(f.fileno(), info, view[offset : offset + length], offset)
        else:
            jobs = [pool.submit(read_part, f.fileno(), info, view[offset : offset + length], offset) for offset, length in pieces]
            for done in jobs:
                done.result()
    return buffer.view(info.torch_dtype).reshape(info.shape)


def read_part(fd: int, info: TensorInfo, view: memoryview, offset: int) -> None:
    """Fill `view` with the tensor's bytes from byte `offset` on (e.g. a block of its rows), from `fd`, an
    open descriptor of its file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], info.start + offset + done)
        if n == 0:
            raise BaseModelError(f"{info.file}: file ends inside tensor {info.name!r}; it is truncated.")
        done += n


class Checkpoint:
    """A base model folder with safetensors weights (one file or shards with an index)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BaseModelError(f"Base model folder {self.root} does not exist.")
        self.config = self._read_config()
        self.shard_names = self._shard_names()
        self.shard_metadata: dict[str, dict[str, str]] = {}
        self.shard_tensors: dict[str, list[TensorInfo]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shard_names:
            metadata, infos = read_header(self.root / shard)
            self.shard_metadata[shard] = metadata
            self.shard_tensors[shard] = infos
            for info in infos:
                if info.name in self.tensors:
                    raise BaseModelError(f"{self.root}: tensor {info.name!r} is stored in two shards.")
                self.tensors[info.name] = info
        self._check_index()

    def _read_config(self) -> dict:
        path = self.root / "config.json"
        if os.path.lexists(path):
            contained_file(self.root, path)
        if not path.is_file():
            raise BaseModelError(f"{self.root} has no config.json; is it a transformers model folder?")
        config = _read_json(path, BaseModelError)
        if not isinstance(config, dict):
            raise BaseModelError(f"{path} holds a JSON {json_kind(config)}, not an object; it is not a model config.")
        return config

    @property
    def index_path(self) -> Path | None:
        """The shard index the weights are read through, if transformers would read one (see _shard_names)."""
        return self._index_path

    def _shard_names(self) -> list[str]:
        """The weight files, chosen as transformers' from_pretrained chooses them (modeling_utils.
        _get_resolved_checkpoint_files): config.json `transformers_weights` if set, else model.safetensors,
        else model.safetensors.index.json. A leftover model.safetensors beside an index wins, as it does there.
        Every file read is checked to lie in the model folder (links too, see `contained_file`)."""
        self.index, self._index_path = None, None
        explicit = self.config.get("transformers_weights")
        if explicit is not None and not (
            isinstance(explicit, str)
            and explicit.endswith((".safetensors", ".safetensors.index.json"))
            and not Path(explicit).is_absolute()
            and ".." not in Path(explicit).parts
        ):
            raise BaseModelError(
                f"{self.root}/config.json names transformers_weights {explicit!r}; weightsteer reads safetensors files "
                "inside the model folder only."
            )
        single, index = self.root / "model.safetensors", self.root / INDEX_NAME
        if explicit is not None:
            single, index = (self.root / explicit, None) if explicit.endswith(".safetensors") else (None, self.root / explicit)
        if single is not None and single.is_file():
            contained_file(self.root, single)
            return [str(single.relative_to(self.root))]
        if index is not None and index.is_file():
            self._index_path = index
            self.index = _read_index(self.root, index)
            names = list(dict.fromkeys(self.index["weight_map"].values()))
            missing = [n for n in names if not (self.root / n).is_file()]
            if missing:
                raise BaseModelError(f"{index} names shards that are missing: {', '.join(missing)}.")
            for name in names:
                contained_file(self.root, self.root / name)
            return names
        others = sorted(p.name for p in self.root.iterdir() if p.suffix in WEIGHT_FORMATS_REFUSED)
        if others:
            raise BaseModelError(
                f"{self.root} has weights only as {', '.join(others)}. weightsteer reads safetensors only: "
                "pickle files can run arbitrary code when loaded and cannot be streamed tensor by tensor. "
                "Convert once with transformers (`AutoModelForCausalLM.from_pretrained(path)."
                "save_pretrained(out)`) and merge into that."
            )
        raise BaseModelError(f"{self.root} has no model.safetensors and no {INDEX_NAME}.")

    def _check_index(self) -> None:
        if self.index is None:
            return
        weight_map = self.index["weight_map"]
        for name, info in self.tensors.items():
            if weight_map.get(name) != info.file.name:
                raise BaseModelError(f"{self.index_path}: tensor {name!r} is in {info.file.name} but the index disagrees.")
        absent = set(weight_map) - set(self.tensors)
        if absent:
            raise BaseModelError(f"{self.index_path} lists tensors no shard holds, e.g. {sorted(absent)[0]!r}.")

    def read(self, name: str, into: torch.Tensor | None = None, pool: Executor | None = None) -> torch.Tensor:
        return read_tensor(self.tensors[name], into, pool)

    def weight_files(self) -> set[str]:
        """The files the weights are read from (relative to root): the shards, and the index if there is one."""
        names = set(self.shard_names)
        if self.index_path:
            names.add(self.index_path.name)
        return names


def _read_json(path: Path, error: type[Exception]) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"{path} is not readable JSON: {e}") from None


def _read_index(root: Path, path: Path) -> dict:
    """A shard index: {"weight_map": {tensor: shard file in the folder}, "metadata": {...}}."""
    contained_file(root, path)
    index = _read_json(path, BaseModelError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BaseModelError(f"{path} has no weight_map of tensor names to shard files; it is not a safetensors index.")
    if not isinstance(index.get("metadata", {}), dict):
        raise BaseModelError(f"{path}: its metadata is not an object.")
    for shard in set(weight_map.values()):
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard.endswith(".safetensors"):
            raise BaseModelError(f"{path} names the shard {shard!r}; shards must be .safetensors files inside the model folder.")
    return index


class ShardWriter:
    """Writes one safetensors file in a layout fixed up front: each tensor's bytes go to their own place in the
    file, whole or a row block at a time, in any order and from several threads; `close` checks that every
    byte was written."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        spans: dict[str, tuple[int, int]] = {}
        for name, dtype, shape in layout:
            nbytes = dtype_itemsize(dtype) * _numel(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            spans[name] = (offset, nbytes)
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        start = 8 + len(encoded)
        self._spans = {name: (start + at, nbytes) for name, (at, nbytes) in spans.items()}  # absolute
        self._left = {name: nbytes for name, (_, nbytes) in spans.items()}  # bytes not written yet
        self._lock = threading.Lock()
        self.nbytes = offset
        self.path = path
        self._file = open(path, "wb", buffering=0)
        self._put(0, struct.pack("<Q", len(encoded)) + encoded)

    def _place(self, name: str, offset: int, nbytes: int) -> int:
        """The file offset of bytes [offset, offset + nbytes) of tensor `name`, counted as written."""
        start, size = self._spans[name]
        if not 0 <= offset <= offset + nbytes <= size:
            raise AssertionError(f"{self.path}: {nbytes} B at {offset} of {name}, which has {size} B")
        with self._lock:
            self._left[name] -= nbytes
        return start + offset

    def _check_whole(self, name: str, nbytes: int) -> None:
        if nbytes != self._spans[name][1]:
            raise AssertionError(f"{self.path}: {nbytes} B for {name}, which has {self._spans[name][1]} B")

    def _put(self, at: int, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._file.fileno(), view[:WRITE_PIECE], at)
            view, at = view[written:], at + written

    def write(self, name: str, tensor: torch.Tensor, staging: torch.Tensor | None = None) -> None:
        """A whole tensor's bytes; a GPU tensor goes through `staging` (a page-locked uint8 buffer) if given."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._check_whole(name, data.numel())
        if data.device.type == "cpu":
            self.write_part(name, 0, data.numpy())
        elif staging is None:
            self.write_part(name, 0, data.cpu().numpy())
        else:
            self._write_staged(name, data, staging)

    def write_part(self, name: str, offset: int, data) -> None:
        """Bytes of tensor `name` from byte `offset` on, from a bytes-like object (e.g. a block of its rows)."""
        view = memoryview(data).cast("B")
        self._put(self._place(name, offset, len(view)), view)

    def _write_staged(self, name: str, data: torch.Tensor, staging: torch.Tensor) -> None:
        """A GPU tensor's bytes through the two halves of `staging`: while one half is written to the file,
        the GPU's copy engine fills the other with the next piece (on a side stream, after the work queued
        so far on the current one), so the device-to-host copies hide behind the writes."""
        piece = max(1, min(STAGE_PIECE, staging.numel() // 2))
        stream = torch.cuda.Stream(data.device)
        stream.wait_stream(torch.cuda.current_stream(data.device))
        pending = None  # the piece copied last, not yet written: (offset, host bytes, event)
        for i, start in enumerate(range(0, data.numel(), piece)):
            half = staging[(i % 2) * piece :][:piece]  # last used by piece i − 2, written out already
            count = min(piece, data.numel() - start)
            with torch.cuda.stream(stream):
                half[:count].copy_(data[start : start + count], non_blocking=True)
                copied = stream.record_event()
            if pending is not None:
                self._write_copied(name, *pending)
            pending = (start, half[:count], copied)
        if pending is not None:
            self._write_copied(name, *pending)

    def _write_copied(self, name: str, offset: int, host: torch.Tensor, copied: "torch.cuda.Event") -> None:
        copied.synchronize()
        self.write_part(name, offset, host.numpy())

    def copy(self, name: str, info: TensorInfo) -> None:
        """Write tensor `name` as an unchanged copy of `info`'s bytes (in the kernel where possible)."""
        self._check_whole(name, info.nbytes)
        at = self._place(name, 0, info.nbytes)
        with open(info.file, "rb", buffering=0) as src:
            done = 0
            while done < info.nbytes:
                count = min(_COPY_CHUNK, info.nbytes - done)
                try:
                    n = os.copy_file_range(src.fileno(), self._file.fileno(), count, info.start + done, at + done)
                except OSError:  # no in-kernel copy here: through memory, a read chunk at a time
                    data = os.pread(src.fileno(), min(count, READ_CHUNK), info.start + done)
                    self._put(at + done, data)
                    n = len(data)
                if n == 0:
                    raise BaseModelError(f"{info.file}: file ends inside tensor {info.name!r}; it is truncated.")
                done += n

    def close(self) -> None:
        self._file.close()
        missing = [name for name, left in self._left.items() if left]
        if missing:
            raise AssertionError(f"{self.path}: {len(missing)} tensors were not written exactly once, the first {missing[0]}")

    def abort(self) -> None:
        self._file.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
