"""`inspect`: what an adapter is, how weightsteer reads its coeff, and how much it changes a base."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import REFUSED, family_for, load_adapter, read_config
from .adapters.base import split_keys
from .checkpoint import Checkpoint
from .errors import UnsupportedAdapterError
from .resolve import resolve
from .planner import Composition, Term, plan_merge


@dataclass
class TensorChange:
    """One base tensor the adapter changes, and by how much at coeff 1 (default scheme)."""

    name: str
    shape: tuple[int, ...]
    relative_change: float  # ‖W₁ − W‖ / ‖W‖


@dataclass
class AdapterReport:
    path: str
    adapter_type: str
    merge: str  # "exact", "fixed task" or "refused"
    reason: str = ""
    base_model: str | None = None
    targets: list[str] = field(default_factory=list)
    rank: object = None
    rank_pattern: dict = field(default_factory=dict)
    parameters: int = 0
    scheme: dict = field(default_factory=dict)
    changes: list[TensorChange] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect(adapter: str | Path, base: str | Path | None = None) -> AdapterReport:
    """Describe an adapter; with `base`, also measure ‖ΔW‖/‖W‖ per changed tensor at coeff 1."""
    from .formats import detect_format, unrecognised_file

    path = Path(adapter).expanduser()
    fmt = detect_format(path) if path.exists() else None
    if fmt is not None:
        return _format_report(fmt, path, base)
    if path.is_file():
        raise unrecognised_file(path)  # the same line merge gives
    folder = resolve(str(adapter), "adapter")
    config = read_config(folder)
    peft_type = config["peft_type"]
    report = AdapterReport(str(adapter), peft_type, "refused", base_model=config.get("base_model_name_or_path"))
    try:
        family = family_for(peft_type)
    except UnsupportedAdapterError as e:
        report.reason = REFUSED.get(peft_type, str(e))
        return report
    refusal = family.refusal(config)
    if refusal is not None:
        report.reason = refusal
        return report
    loaded = load_adapter(folder)
    report.merge = "fixed task" if peft_type == "POLY" else "exact"
    report.reason = "one task id per merged model (--task-id)" if peft_type == "POLY" else "closed-form weight change"
    report.rank = config.get("r")
    report.rank_pattern = config.get("rank_pattern") or {}
    report.parameters = sum(t.numel() for t in loaded.tensors.values())
    modules, replaced, _ = split_keys(loaded.tensors, family.tokens, family.shared_tokens, nested=family.nested)
    report.targets = sorted([*modules, *replaced])
    default = family.scheme(None)
    report.scheme = {"name": default.name, "formula": default.formula, "meaning": default.meaning}
    if base is not None:
        report.changes = _changes(loaded, Checkpoint(resolve(str(base), "base")), default)
    return report


def _format_report(fmt, path: Path, base: str | Path | None) -> AdapterReport:
    """A steering format's artefact: its format name, what it steers, and (with a base) the tensors it changes."""
    from .formats.vectors import VectorArtefact

    report = AdapterReport(str(path), fmt.name, "refused")
    try:
        loaded = fmt.read(path)
    except UnsupportedAdapterError as e:
        report.reason = str(e)
        return report
    default = loaded.family.scheme(None)
    report.merge, report.reason = "exact", f"{fmt.summary}; runtime twin: {fmt.runtime}"
    report.base_model = loaded.base_model
    report.parameters = sum(t.numel() for t in loaded.tensors.values())
    report.scheme = {"name": default.name, "formula": default.formula, "meaning": default.meaning}
    if isinstance(loaded, VectorArtefact):
        blocks = sorted(loaded.directions())
        report.targets = [f"after block {n}" for n in blocks]
        if 0 in blocks and fmt.name == "control-vector-gguf":
            report.reason += "; warning: it holds direction.0, which makes llama.cpp reject the file (weightsteer bakes it after block 0)"
    else:
        report.targets = sorted({name.rpartition("|")[0] or name.rpartition(".")[0] for name in loaded.tensors})
    if base is not None:
        report.changes = _changes(loaded, Checkpoint(resolve(str(base), "base")), default)
    return report


def _changes(adapter, checkpoint: Checkpoint, scheme) -> list[TensorChange]:
    plan = plan_merge(checkpoint, adapter, options={"task_id": 0})
    at_one = Composition((Term(0, 1.0, scheme),))
    changes = []
    for tensor in plan.edited:
        weight = checkpoint.read(tensor.source.name).float()
        delta = plan.edit(tensor, at_one)(weight) - weight
        norm = float(torch.linalg.vector_norm(weight))
        changes.append(TensorChange(tensor.name, tensor.shape, float(torch.linalg.vector_norm(delta)) / norm if norm else math.inf))
    return changes


def format_report(report: AdapterReport) -> str:
    lines = [
        f"adapter     {report.path}",
        f"type        {report.adapter_type}",
        f"merge       {report.merge}: {report.reason}",
    ]
    if report.merge == "refused":
        return "\n".join(lines)
    lines += [
        f"base model  {report.base_model}",
        f"rank        {report.rank}" + (f" (pattern {report.rank_pattern})" if report.rank_pattern else ""),
        f"parameters  {report.parameters:,}",
        f"targets     {len(report.targets)} modules",
        f"coeff       scheme {report.scheme['name']}: {report.scheme['formula']}  ({report.scheme['meaning']})",
    ]
    if report.changes:
        width = max(len(c.name) for c in report.changes)
        lines += ["", f"{'tensor'.ljust(width)}  shape          ‖ΔW‖/‖W‖ at c=1"]
        lines += [f"{c.name.ljust(width)}  {str(tuple(c.shape)).ljust(13)}  {c.relative_change:.3e}" for c in report.changes]
    return "\n".join(lines)
