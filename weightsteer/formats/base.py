"""What a format provides: recognising its files (or Python objects) and reading them into an `Artefact`.

A format keeps the three jobs of a family apart, as PEFT families do: the format *reads* (files or objects →
an Artefact: a config dict and fp32 tensors), its `family` (an `AdapterFamily`) *parses* those into module
states and gives the *closed form* (weight, bias, low-rank factors) and the coeff schemes, and `runtime` names
the *runtime twin* (the project's own hooks, which the closed form reproduces).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

import torch

from ..adapters import Adapter
from ..adapters.base import AdapterFamily


@dataclass
class Artefact(Adapter):
    """A non-PEFT steering artefact, read into the shape the planner merges (like a PEFT `Adapter`)."""

    format: str = ""

    @property
    def peft_type(self) -> str:
        return self.format

    def replacements(self) -> dict[str, torch.Tensor]:
        return {}


class Format:
    """Base class for one steering format. Subclasses fill in the class attributes and `read`."""

    name: ClassVar[str]  # registry key, e.g. "cwsteer"
    summary: ClassVar[str]  # one line: what files it reads
    family: ClassVar[AdapterFamily]  # closed form and coeff schemes
    runtime: ClassVar[str]  # the runtime twin the merge reproduces, in words

    def detect(self, path: Path) -> bool:
        """Is this file or folder in this format? Cheap: look at names, headers and metadata only."""
        return False

    def read(self, path: Path) -> Artefact:
        raise NotImplementedError

    def detect_object(self, obj: object) -> bool:
        """Is this Python object one this format reads (duck-typed; never import its package to check)?"""
        return False

    def from_object(self, obj: object) -> Artefact:
        raise NotImplementedError

    def artefact(self, path: Path | str, config: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> Artefact:
        return Artefact(Path(path), dict(config), self.family, dict(tensors), self.name)
