"""The merge API: load the adapter, plan from the base's headers, stream, and publish one checkpoint per coeff."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import DTYPES, Checkpoint
from .engine import RoundingReport, stream
from .errors import BaseModelError, SchemeError
from .formats import Artefact, load_artefact, reference
from .outputs import check_output, publish, remove_quietly, staging_dir
from .planner import MergePlan, plan_merge
from .provenance import finish_output
from .resolve import resolve

PathLike = str | os.PathLike


@dataclass
class MergeResult:
    """One written checkpoint."""

    path: Path
    coeff: float
    scheme: str
    adapter_type: str
    changed_tensors: list[str] = field(default_factory=list)
    rounding: RoundingReport = field(default_factory=RoundingReport)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # read / compute / write, shared by one run

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["rounding"] |= {"swallowed_share": self.rounding.swallowed_share, "relative_error": self.rounding.relative_error}
        return data


def merge(
    adapter: PathLike | object,
    output: PathLike,
    *,
    coeff: float = 1.0,
    base: PathLike | None = None,
    scheme: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
) -> Path:
    """Merge `adapter` into its base at strength `coeff` and write a standalone checkpoint to `output`.

    `adapter` is a PEFT adapter folder or Hub repo id, a steering artefact's file or folder (cwsteer,
    AntiPaSTO, weight-steering w.pt, a control-vector GGUF, a steering-lite vector), or a Python vector object
    (repeng ControlVector, steering-vectors SteeringVector, steering-lite Vector). `base` defaults to the
    adapter config's base_model_name_or_path; both may be local folders or Hub repo ids. `scheme` picks how coeff is read (default "linear"; see `weightsteer schemes`).
    `task_id` selects the task of a Poly adapter. Returns the output folder.
    """
    results = merge_many(
        adapter,
        {coeff: output},
        base=base,
        scheme=scheme,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        progress=progress,
        task_id=task_id,
    )
    return results[0].path


def merge_many(
    adapter: PathLike | object,
    outputs: Mapping[float, PathLike],
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
) -> list[MergeResult]:
    """Like `merge`, for several coeffs at once: the base is read once, one checkpoint per coeff."""
    targets = {finite_coeff(c): Path(p) for c, p in outputs.items()}
    if not targets:
        raise SchemeError("Give at least one coeff.")
    for path in targets.values():
        check_output(path, overwrite)
    plan, base_ref, options = open_plan(adapter, base=base, scheme=scheme, task_id=task_id, dtype=_torch_dtype(dtype))
    loaded, chosen = plan.adapter, plan.scheme
    results = [MergeResult(path, c, chosen.name, loaded.peft_type) for c, path in targets.items()]
    for result in results:
        if not chosen.base_at_zero and result.coeff == 0:
            result.warnings.append(f"scheme {chosen.name} does not give the base model at coeff 0.")
    stagings = [staging_dir(r.path) for r in results]
    try:
        stream(plan, results, stagings, torch.device(device or "cpu"), progress)
        for result, staging in zip(results, stagings):
            finish_output(plan, loaded, reference(adapter, loaded), base_ref, options, result, staging, results)
        for result, staging in zip(results, stagings):
            publish(staging, result.path)
    finally:
        for staging in stagings:
            remove_quietly(staging)
    return results


def open_plan(
    adapter: PathLike | object,
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    task_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MergePlan, str, dict[str, object]]:
    """Load the adapter (or steering artefact), read the base's headers and plan the change: (plan, base reference, options)."""
    loaded = load_artefact(adapter)
    base_ref = str(base if base is not None else loaded.base_model or "")
    if not base_ref:
        source = f"the {loaded.peft_type} artefact {loaded.path}" if isinstance(loaded, Artefact) else f"{loaded.path}/adapter_config.json"
        raise BaseModelError(f"{source} names no base model; pass --base (base=...).")
    if task_id is not None and "task_id" not in loaded.family.options:
        raise SchemeError(f"--task-id applies to Poly adapters only; {loaded.path} is a {loaded.peft_type} adapter.")
    options: dict[str, object] = {"task_id": task_id} if task_id is not None else {}
    checkpoint = Checkpoint(resolve(base_ref, "base"))
    return plan_merge(checkpoint, loaded, loaded.family.scheme(scheme), dtype, options), base_ref, options


def finite_coeff(c: float) -> float:
    c = float(c)
    if not math.isfinite(c):
        raise SchemeError(f"coeff must be a finite number, got {c}.")
    return c


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}
    if dtype not in names:
        raise SchemeError(f"Unknown dtype {dtype!r}; use one of float32, float16, bfloat16.")
    return DTYPES[names[dtype]]


