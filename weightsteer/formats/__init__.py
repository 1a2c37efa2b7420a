"""Steering formats beyond PEFT, detected from their files (or Python objects), one module each.

Every format registers like an adapter family: the built-ins in BUILTIN_FORMATS (format name → spec),
plugins as entry points in the group `weightsteer.formats` whose object is a `Format` (see
weightsteer.registry). `load_artefact` is what `merge` calls: a Python vector object, a file or folder a
format recognises, or else a PEFT adapter folder / Hub repo id.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapters import Adapter, load_adapter
from ..errors import AdapterError
from ..registry import Registry
from .base import Artefact, Format

BUILTIN_FORMATS = {
    "cwsteer": "weightsteer.formats.cwsteer:CWSteer",
    "weight-steering": "weightsteer.formats.weight_steering:WeightSteering",
    "antipasto": "weightsteer.formats.antipasto:AntiPaSTO",
    "control-vector-gguf": "weightsteer.formats.control_vector:ControlVectorGGUF",
    "steering-lite": "weightsteer.formats.steering_lite:SteeringLite",
    "repeng": "weightsteer.formats.repeng:Repeng",
    "steering-vectors": "weightsteer.formats.steering_vectors:SteeringVectors",
}

FORMATS = Registry(BUILTIN_FORMATS, Format, normalize=str.lower)


def all_formats() -> list[Format]:
    return FORMATS.unique()


def detect_format(path: Path) -> Format | None:
    """The format whose files these are, or None (then it is a PEFT adapter, or nothing weightsteer reads)."""
    found = [f for f in all_formats() if f.detect(path)]
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise AdapterError(f"{path} looks like several steering formats ({names}); pass the file itself, not its folder.")
    return found[0] if found else None


def load_artefact(ref: object) -> Adapter:
    """A PEFT adapter or a steering artefact: a Python vector object, a file or folder a format reads, or a PEFT
    adapter folder / Hub repo id."""
    from ..resolve import resolve

    if not isinstance(ref, (str, os.PathLike)):
        for fmt in all_formats():
            if fmt.detect_object(ref):
                return fmt.from_object(ref)
        raise AdapterError(
            f"weightsteer cannot read a {type(ref).__name__} object; pass a path, a repeng ControlVector, a "
            "steering-vectors SteeringVector or a steering-lite Vector."
        )
    path = Path(ref).expanduser()
    if path.exists():
        fmt = detect_format(path)
        if fmt is not None:
            return fmt.read(path)
        if path.is_file():
            raise unrecognised_file(path)
    return load_adapter(resolve(str(ref), "adapter"))


def unrecognised_file(path: Path) -> AdapterError:
    known = ", ".join(f.name for f in all_formats())
    return AdapterError(f"{path} is a file that no steering format recognises ({known}); for a PEFT adapter pass its folder.")


def reference(ref: object, loaded: Adapter) -> str:
    """How provenance names what was merged: the path or repo id, or the kind of object passed."""
    return str(ref) if isinstance(ref, (str, os.PathLike)) else f"<{loaded.peft_type} {type(ref).__name__} object>"


__all__ = ["Artefact", "Format", "BUILTIN_FORMATS", "FORMATS", "all_formats", "detect_format", "load_artefact", "reference", "unrecognised_file"]
