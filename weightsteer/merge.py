"""The merge engine: stream the base checkpoint once, write one output checkpoint per coeff."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter, load_adapter
from .card import base_license, write_card
from .checkpoint import DTYPES, Checkpoint, ShardWriter
from .errors import AdapterError, BaseModelError, SchemeError
from .hub import resolve, snapshot_revision
from .outputs import PROVENANCE_NAME, check_output, copy_support_files, publish, remove_quietly, staging_dir, write_index
from .planner import MergePlan, OutputTensor, plan_merge

PathLike = str | os.PathLike
ROUNDING_WARN_SHARE = 0.25


SAMPLE_ELEMENTS = 1 << 20  # rounding statistics of a larger tensor come from evenly strided rows


@dataclass
class RoundingReport:
    """How much of the fp32 change survived rounding to the output dtype.

    Counts and norms are exact for tensors up to SAMPLE_ELEMENTS elements; a larger tensor contributes
    every k-th row, weighted by k (an unbiased estimate from at least a million elements).
    """

    changed: float = 0  # elements whose fp32 value changed
    swallowed: float = 0  # of those, elements that rounded back to the base value
    change_norm_sq: float = 0.0  # ‖W' − W‖² in fp32
    error_norm_sq: float = 0.0  # ‖round(W') − W'‖² over changed tensors

    def add(self, base: torch.Tensor, target: torch.Tensor, rounded: torch.Tensor, base_rounded: torch.Tensor) -> None:
        step = max(1, target.numel() // SAMPLE_ELEMENTS) if target.dim() > 1 else 1
        base, target, rounded, base_rounded = (t[::step] for t in (base, target, rounded, base_rounded))
        diff = (target - base).reshape(-1)
        error = (rounded.float() - target).reshape(-1)
        changed = int(torch.count_nonzero(diff))
        # An element that kept a change after rounding was changed, so the two counts nest.
        self.changed += step * changed
        self.swallowed += step * (changed - int(torch.count_nonzero(rounded != base_rounded)))
        self.change_norm_sq += step * float(torch.dot(diff, diff))
        self.error_norm_sq += step * float(torch.dot(error, error))

    @property
    def swallowed_share(self) -> float:
        return self.swallowed / self.changed if self.changed else 0.0

    @property
    def relative_error(self) -> float:
        """‖round(W') − W'‖ / ‖W' − W‖: the share of the change that rounding lost or distorted."""
        return math.sqrt(self.error_norm_sq / self.change_norm_sq) if self.change_norm_sq else 0.0

    def summary(self, dtype: str) -> str:
        return (
            f"rounding to {dtype}: {self.swallowed_share:.1%} of changed elements rounded back to the base value; "
            f"relative error of the change {self.relative_error:.2%}"
        )


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
) -> Path:
    """Merge `adapter` into its base at strength `coeff` and write a standalone checkpoint to `output`.

    `base` defaults to the adapter config's base_model_name_or_path; both may be local folders or Hub
    repo ids. `scheme` picks how coeff is read (default "linear"; see `weightsteer schemes`).
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
        _stream(plan, results, stagings, torch.device(device or "cpu"), progress)
        for result, staging in zip(results, stagings):
            _finish(plan, loaded, str(adapter), base_ref, options, result, staging, results)
        for result, staging in zip(results, stagings):
            publish(staging, result.path)
    finally:
        for staging in stagings:
            remove_quietly(staging)
    return results


def _keep_freed_memory_for_reuse() -> None:
    """Let glibc recycle freed large blocks instead of unmapping them.

    Every fp32 temporary of a big tensor is a fresh allocation; by default glibc maps each one anew and
    the kernel zero-fills it page by page, which measured at half of the CPU merge time. Raising the
    mmap and trim thresholds keeps those pages in the heap for the next tensor (peak memory unchanged).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    mallopt(M_ARENA_MAX, 1)  # one heap for the reader, compute and writer threads: measured 10-20 % less peak RSS


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers


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


class _PhaseClock:
    """Busy seconds per phase (read / compute / write; they overlap), for the report and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "compute": 0.0, "write": 0.0}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def _stream(plan: MergePlan, results: Sequence[MergeResult], stagings: Sequence[Path], device: torch.device, progress: bool) -> None:
    """Write every output shard. Reading, computing and writing overlap: one thread prefetches the
    tensors to change, the caller's thread computes, one thread writes in order."""
    if device.type == "cpu":
        _keep_freed_memory_for_reuse()
    moved: dict[int, torch.Tensor] = {}
    for tensor in plan.edited:
        tensor.edit.to(device, moved)
    computed = [t for tensors in plan.shards.values() for t in tensors if _needs_read(plan, t, results)]
    clock = _PhaseClock()
    # On a GPU, one page-locked buffer for reads and one for writes make host↔device copies fast.
    largest = max((max(t.source.nbytes, t.nbytes) for t in computed), default=0)
    pinned = [torch.empty(largest, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if device.type == "cuda" else [None, None]
    total = sum(t.source.nbytes for tensors in plan.shards.values() for t in tensors)
    opened: list[ShardWriter] = []
    with (
        ThreadPoolExecutor(1, "weightsteer-read") as reader,
        ThreadPoolExecutor(1, "weightsteer-write") as writer,
        tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress) as bar,
    ):
        reads = _Prefetch(reader, computed, lambda t: _read(plan, t, device, clock, pinned[0]))
        writes = _OrderedWrites(writer)
        try:
            for shard, tensors in plan.shards.items():
                layout = [(t.name, t.dtype, t.shape) for t in tensors]
                metadata = {**plan.checkpoint.shard_metadata[shard], "format": "pt"}
                shard_writers = [ShardWriter(staging / shard, layout, metadata) for staging in stagings]
                opened += shard_writers
                for tensor in tensors:
                    if _needs_read(plan, tensor, results):
                        outputs = _outputs(plan, tensor, reads.next(), results, clock)
                        writes.submit(_write_all, shard_writers, tensor.name, outputs, clock, pinned[1])
                    else:
                        writes.submit(_copy_all, shard_writers, tensor, clock)
                    bar.update(tensor.source.nbytes)
                writes.submit(_close_all, shard_writers)
            writes.drain()
        except BaseException:
            writer.shutdown(cancel_futures=True)
            for shard_writer in opened:
                shard_writer.abort()
            raise
    for result in results:
        result.seconds = dict(clock.seconds)


PREFETCH_DEPTH = 1  # tensors read ahead; bounds memory to a few tensors whatever the model size
WRITE_DEPTH = 1  # tensors waiting to be written (a second queue was measured no faster)


class _Prefetch:
    """Runs `read` on the given items in order, at most PREFETCH_DEPTH ahead of the consumer."""

    def __init__(self, pool: ThreadPoolExecutor, items: list, read):
        self._pending: deque[Future] = deque()
        self._items = iter(items)
        self._pool, self._read = pool, read
        for _ in range(PREFETCH_DEPTH):
            self._schedule()

    def _schedule(self) -> None:
        item = next(self._items, None)
        if item is not None:
            self._pending.append(self._pool.submit(self._read, item))

    def next(self):
        result = self._pending.popleft().result()
        self._schedule()
        return result


class _OrderedWrites:
    """Runs writes on one thread in submission order, blocking when WRITE_DEPTH are pending."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._pending: deque[Future] = deque()

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > WRITE_DEPTH:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()


def _needs_read(plan: MergePlan, tensor: OutputTensor, results: Sequence[MergeResult]) -> bool:
    edited = tensor.edit is not None and any(not _is_base(plan, r.coeff) for r in results)
    return edited or tensor.dtype != tensor.source.dtype


def _read(
    plan: MergePlan, tensor: OutputTensor, device: torch.device, clock: _PhaseClock, pinned: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base in fp32, base rounded to the output dtype), both on the compute device.

    With a pinned buffer the copy to the GPU is synchronous, so the buffer is free again on return."""
    with clock("read"):
        stored = plan.checkpoint.read(tensor.source.name, into=pinned).to(device)
        return stored.float(), stored.to(DTYPES[tensor.dtype])


def _outputs(plan: MergePlan, tensor: OutputTensor, bases, results: Sequence[MergeResult], clock: _PhaseClock) -> list[torch.Tensor]:
    base, base_rounded = bases
    with clock("compute"):
        return [
            _merged(tensor, base, base_rounded, plan, result) if tensor.edit is not None and not _is_base(plan, result.coeff) else base_rounded
            for result in results
        ]


def _write_all(
    writers: Sequence[ShardWriter], name: str, outputs: Sequence[torch.Tensor], clock: _PhaseClock, pinned: torch.Tensor | None
) -> None:
    with clock("write"):
        for writer, output in zip(writers, outputs):
            writer.write(name, output, pinned)


def _copy_all(writers: Sequence[ShardWriter], tensor: OutputTensor, clock: _PhaseClock) -> None:
    with clock("write"):
        for writer in writers:
            writer.copy(tensor.name, tensor.source)


def _close_all(writers: Sequence[ShardWriter]) -> None:
    for writer in writers:
        writer.close()


def _merged(tensor: OutputTensor, base: torch.Tensor, base_rounded: torch.Tensor, plan: MergePlan, result: MergeResult) -> torch.Tensor:
    """The edited tensor at result.coeff, rounded once to the output dtype; updates the report."""
    target = tensor.edit(base, plan.scheme, result.coeff)
    if not math.isfinite(float(target.sum())):  # one pass; NaN and inf survive a sum
        raise AdapterError(f"Merging {tensor.name} at coeff {result.coeff} gives NaN or inf; check the adapter and coeff.")
    rounded = target.to(base_rounded.dtype)
    before = result.rounding.changed
    result.rounding.add(base, target, rounded, base_rounded)
    if result.rounding.changed > before or not torch.equal(target, base):
        result.changed_tensors.append(tensor.name)
    return rounded


def _is_base(plan: MergePlan, coeff: float) -> bool:
    return coeff == 0 and plan.scheme.base_at_zero


def _finish(
    plan: MergePlan,
    adapter: Adapter,
    adapter_ref: str,
    base_ref: str,
    options: Mapping[str, object],
    result: MergeResult,
    staging: Path,
    results: Sequence[MergeResult],
) -> None:
    if not result.changed_tensors and result.coeff != 0:
        raise AdapterError(
            f"Merging {adapter_ref} at coeff {result.coeff} changes no tensor: every delta is zero. "
            "Is the adapter still at its initialisation (e.g. LoRA B = 0)?"
        )
    out_dtype = {t.dtype for t in plan.edited} or {"unchanged"}
    if result.rounding.swallowed_share > ROUNDING_WARN_SHARE:
        result.warnings.append(
            f"{result.rounding.summary('/'.join(sorted(out_dtype)))}. Most of the change is lost; "
            "use a larger |coeff| or --dtype float32."
        )
    if plan.checkpoint.index is not None:
        weight_map = {t.name: shard for shard, tensors in plan.shards.items() for t in tensors}
        total = sum(t.nbytes for tensors in plan.shards.values() for t in tensors)
        write_index(staging, weight_map, total, plan.checkpoint.index.get("metadata", {}))
    copy_support_files(plan.checkpoint, staging, plan.config_patch)
    provenance = {
        "weightsteer_version": __version__,
        "adapter": adapter_ref,
        "adapter_revision": snapshot_revision(adapter.path),
        "adapter_type": adapter.peft_type,
        "base_model": base_ref,
        "base_revision": snapshot_revision(plan.checkpoint.root),
        "base_license": base_license(plan.checkpoint.root),
        "coeff": result.coeff,
        "scheme": {"name": plan.scheme.name, "formula": plan.scheme.formula},
        "options": dict(options),
        "config_patch": plan.config_patch,
        "result": result.to_dict() | {"path": None},
        "siblings": [{"coeff": r.coeff, "name": r.path.name} for r in results if r is not result],
    }
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(staging, title=result.path.name)
