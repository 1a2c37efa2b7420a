"""The streaming engine: read the base once, compute every changed tensor in fp32, write each output
shard by shard. Reading, computing and writing overlap: one thread prefetches the tensors to change, the
caller's thread computes, one thread writes in order. Nothing here decides what changes (planner) or
what else goes into an output folder (provenance)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import DTYPES, ShardWriter
from .errors import AdapterError
from .planner import Composition, Edit, MergePlan, NewTensor, OutputTensor


class StreamTarget(Protocol):
    """What the engine fills in for one output (a MergeResult)."""

    changed_tensors: list[str]
    rounding: "RoundingReport"
    seconds: dict[str, float]


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


def stream(
    plan: MergePlan,
    compositions: Sequence[Composition],
    results: Sequence[StreamTarget],
    stagings: Sequence[Path],
    device: torch.device,
    progress: bool,
) -> None:
    """Write every output shard of every result (one per composition) into its staging folder, from one
    read of the base: each tensor is read once and computed for every output that changes it."""
    if device.type == "cpu":
        _keep_freed_memory_for_reuse()
    moved: dict[int, torch.Tensor] = {}
    edits: dict[str, list[Edit | None]] = {}
    for tensor in plan.edited + plan.added:
        for change in tensor.changes.values():
            change.to(device, moved)
        edits[tensor.name] = [plan.edit(tensor, composition) for composition in compositions]
    computed = [t for tensors in plan.shards.values() for t in tensors if _needs_read(t, edits)]
    clock = _PhaseClock()
    # On a GPU, one page-locked buffer for reads and one for writes make host↔device copies fast.
    largest = max([max(t.source.nbytes, t.nbytes) for t in computed] + [t.nbytes for t in plan.added], default=0)
    pinned = [torch.empty(largest, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if device.type == "cuda" else [None, None]
    total = sum(_read_bytes(t) for tensors in plan.shards.values() for t in tensors)
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
                    if isinstance(tensor, NewTensor):  # a change to an all-zero base tensor
                        outputs = _outputs(tensor, edits[tensor.name], _zeros(tensor, device), results, clock)
                        writes.submit(_write_all, shard_writers, tensor.name, outputs, clock, pinned[1])
                    elif _needs_read(tensor, edits):
                        outputs = _outputs(tensor, edits.get(tensor.name), reads.next(), results, clock)
                        writes.submit(_write_all, shard_writers, tensor.name, outputs, clock, pinned[1])
                    else:
                        writes.submit(_copy_all, shard_writers, tensor, clock)
                    bar.update(_read_bytes(tensor))
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


def _read_bytes(tensor: OutputTensor | NewTensor) -> int:
    return 0 if isinstance(tensor, NewTensor) else tensor.source.nbytes


def _zeros(tensor: NewTensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The base a new tensor is computed from, as _read gives it: (fp32, output dtype)."""
    zeros = torch.zeros(tensor.shape, device=device)
    return zeros, zeros.to(DTYPES[tensor.dtype])


def _needs_read(tensor: OutputTensor | NewTensor, edits: dict[str, list[Edit | None]]) -> bool:
    if isinstance(tensor, NewTensor):
        return False
    edited = any(edit is not None for edit in edits.get(tensor.name, ()))
    return edited or tensor.dtype != tensor.source.dtype


def _read(
    plan: MergePlan, tensor: OutputTensor, device: torch.device, clock: _PhaseClock, pinned: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base in fp32, base rounded to the output dtype), both on the compute device.

    With a pinned buffer the copy to the GPU is synchronous, so the buffer is free again on return."""
    with clock("read"):
        stored = plan.checkpoint.read(tensor.source.name, into=pinned).to(device)
        return stored.float(), stored.to(DTYPES[tensor.dtype])


def _outputs(
    tensor: OutputTensor, edits: list[Edit | None] | None, bases, results: Sequence[StreamTarget], clock: _PhaseClock
) -> list[torch.Tensor]:
    base, base_rounded = bases
    with clock("compute"):
        return [
            base_rounded if edit is None else _merged(tensor, edit, base, base_rounded, result)
            for edit, result in zip(edits or [None] * len(results), results)
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


def _merged(tensor: OutputTensor, edit: Edit, base: torch.Tensor, base_rounded: torch.Tensor, result: StreamTarget) -> torch.Tensor:
    """The edited tensor (every step of the output's composition), rounded once to the output dtype; updates the report."""
    target = edit(base)
    if not math.isfinite(float(target.sum())):  # one pass; NaN and inf survive a sum
        coeffs = ", ".join(f"{step.coeff:g}" for step in edit.steps)
        raise AdapterError(f"Merging {tensor.name} at coeff {coeffs} gives NaN or inf; check the adapter and coeff.")
    rounded = target.to(base_rounded.dtype)
    if target.shape != base.shape:  # added token rows have no base value: the report leaves them out
        base, base_rounded = (torch.cat([t, r[t.shape[0] :]]) for t, r in ((base, target), (base_rounded, rounded)))
    before = result.rounding.changed
    result.rounding.add(base, target, rounded, base_rounded)
    if result.rounding.changed > before or not torch.equal(target, base):
        result.changed_tensors.append(tensor.name)
    return rounded
