"""The merge API: load the adapter, plan from the base's headers, stream, and publish one checkpoint per coeff."""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .adapters import load_adapter
from .checkpoint import DTYPES, Checkpoint
from .engine import RoundingReport, stream
from .errors import AdapterError, BaseModelError, DeviceError, OutputError, SchemeError
from .outputs import OutputSlot, check_free_space, disk_errors, fault_point, support_files
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
    adapter: PathLike,
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
    base_id: str | None = None,
) -> Path:
    """Merge `adapter` into its base at strength `coeff` and write a standalone checkpoint to `output`.

    `base` defaults to the adapter config's base_model_name_or_path; both may be local folders or Hub
    repo ids. `scheme` picks how coeff is read (default "linear"; see `weightsteer schemes`).
    `task_id` selects the task of a Poly adapter. `base_id` (a Hub repo id) fills the card's base_model
    when the base is a local folder. Returns the output folder.
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
        base_id=base_id,
    )
    return results[0].path


def merge_many(
    adapter: PathLike,
    outputs: Mapping[float, PathLike],
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    task_id: int | None = None,
    base_id: str | None = None,
) -> list[MergeResult]:
    """Like `merge`, for several coeffs at once: the base is read once, one checkpoint per coeff."""
    targets = {finite_coeff(c): Path(os.path.abspath(p)) for c, p in outputs.items()}
    if not targets:
        raise SchemeError("Give at least one coeff.")
    if len(set(targets.values())) != len(targets):
        raise OutputError("Two coeffs would write to the same output folder; give each coeff its own.")
    compute_device = checked_device(device)
    with ExitStack() as held:
        slots = [held.enter_context(OutputSlot(path, overwrite)) for path in targets.values()]  # locked until published
        fault_point("locked")
        plan, base_ref, options = open_plan(adapter, base=base, scheme=scheme, task_id=task_id, dtype=_torch_dtype(dtype))
        loaded, chosen = plan.adapter, plan.scheme
        for slot in slots:
            slot.protect(base=plan.checkpoint.root, adapter=loaded.path)
        check_free_space([(slot.output, output_bytes(plan)) for slot in slots])
        results = [MergeResult(path, c, chosen.name, loaded.peft_type, warnings=list(slot.notes)) for (c, path), slot in zip(targets.items(), slots)]
        for result in results:
            if not chosen.base_at_zero and result.coeff == 0:
                result.warnings.append(f"scheme {chosen.name} does not give the base model at coeff 0.")
        with disk_errors(slots[0].output.parent):
            stagings = [slot.stage() for slot in slots]
            stream(plan, results, stagings, compute_device, progress)
            for result, staging in zip(results, stagings):
                finish_output(plan, loaded, str(adapter), base_ref, options, result, staging, results, base_id=base_id)
            for slot in slots:
                slot.publish()
    return results


def output_bytes(plan: MergePlan) -> int:
    """The size of one output folder, an upper bound: its tensors, the base's other files (whose links are
    checked here, before any work), headers, index, card and weightsteer.json."""
    tensors = sum(t.nbytes for shard in plan.shards.values() for t in shard) + sum(8 + 64 * len(shard) for shard in plan.shards.values())
    support = sum(real.stat().st_size for _, real in support_files(plan.checkpoint))
    return tensors + support + 1_000_000


def checked_device(device: str | torch.device | None) -> torch.device:
    """The compute device, refused clearly when torch does not know it or this machine lacks it."""
    try:
        chosen = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"Unknown device {device!r} ({e}); use cpu, cuda, cuda:N or mps.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if chosen.type not in available:
        raise DeviceError(f"Device {device!r} is not supported; use cpu, cuda, cuda:N or mps.")
    if not available[chosen.type]:
        raise DeviceError(f"Device {device!r} is not available: this torch build or machine has no {chosen.type}; use cpu.")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DeviceError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices.")
    return chosen


def open_plan(
    adapter: PathLike,
    *,
    base: PathLike | None = None,
    scheme: str | None = None,
    task_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MergePlan, str, dict[str, object]]:
    """Load the adapter, read the base's headers and plan the change: (plan, base reference, options)."""
    loaded = load_adapter(resolve(str(adapter), "adapter"))
    base_ref = str(base if base is not None else loaded.base_model or "")
    if not base_ref:
        raise BaseModelError(f"{loaded.path}/adapter_config.json names no base_model_name_or_path; pass --base.")
    if task_id is not None and "task_id" not in loaded.family.options:
        raise SchemeError(f"--task-id applies to Poly adapters only; {loaded.path} is a {loaded.peft_type} adapter.")
    options: dict[str, object] = {"task_id": task_id} if task_id is not None else {}
    checkpoint = Checkpoint(resolve(base_ref, "base"))
    plan = plan_merge(checkpoint, loaded, loaded.family.scheme(scheme), dtype, options)
    _refuse_zero_change(plan)
    return plan, base_ref, options


def _refuse_zero_change(plan: MergePlan) -> None:
    """Before the base is streamed: does the adapter change anything at coeff 1? Module by module, stopping at
    the first change: from the family's low-rank factors where it has them (‖BA‖² = tr(BᵀB·AAᵀ)), else on a
    random base tensor of the module's shape."""
    generator = torch.Generator().manual_seed(0)
    for tensor in plan.edited:
        edit = tensor.edit
        if edit.part == "replace":
            return  # the planner keeps only stored tensors that differ from the base
        shape = tuple(tensor.shape[::-1]) if edit.state.fan_in_fan_out else tuple(tensor.shape)
        factors = edit.family.low_rank(edit.state, shape) if edit.part == "weight" and len(shape) == 2 else None
        if factors is not None:
            b, a = (f.double() for f in factors)
            if float(torch.trace((b.T @ b) @ (a @ a.T))) > 0:
                return
            continue
        base = torch.randn(tensor.shape, generator=generator)
        if not torch.equal(edit(base, plan.scheme, 1.0), base):
            return
    raise AdapterError(
        f"The adapter {plan.adapter.path} changes no tensor: every module's delta is zero. Is it still at its "
        "initialisation (e.g. LoRA B = 0)? Nothing was written."
    )


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


