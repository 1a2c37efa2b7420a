"""The streaming engine: read the base once, compute every changed tensor in fp32, write each output
shard by shard. Reading, computing and writing overlap: one thread prefetches the tensors to change, the
caller's thread (with compute workers on a CPU) computes, one thread per output writes its shards. On a CPU
a low-rank change skips the prefetch and the writers: the compute workers read its row blocks from the base
file and write them, rounded, straight into the output files. Nothing here decides what changes (planner)
or what else goes into an output folder (provenance)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import Callable, Protocol, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import DTYPES, FLOAT_CODES, STAGE_PIECE, ShardWriter, TensorInfo, read_part
from .errors import AdapterError
from .outputs import fault_point
from .planner import Composition, Edit, MergePlan, NewTensor, OutputTensor


class StreamTarget(Protocol):
    """What the engine fills in for one output (a MergeResult)."""

    changed_tensors: list[str]
    rounding: "RoundingReport"
    seconds: dict[str, float]


SAMPLE_ELEMENTS = 1 << 16  # rounding statistics of a larger tensor come from evenly strided rows


@dataclass
class RoundingReport:
    """How much of the fp32 change survived rounding to the output dtype.

    Counts and norms are exact for tensors up to SAMPLE_ELEMENTS elements; a larger tensor contributes
    every k-th row, weighted by k (an unbiased estimate from at least 65 536 of its elements; a model's
    report sums millions). At 2²⁰ elements a tensor the statistics cost ~20 % of a 2-core CPU merge.
    """

    changed: float = 0  # elements whose fp32 value changed
    swallowed: float = 0  # of those, elements that rounded back to the base value
    change_norm_sq: float = 0.0  # ‖W' − W‖² in fp32
    error_norm_sq: float = 0.0  # ‖round(W') − W'‖² over changed tensors
    overflowed: float = 0  # elements finite in fp32 that became ±inf in the output dtype (exact count)
    overflow_tensor: str | None = None  # the first tensor that overflowed, and its largest |value| in fp32
    overflow_peak: float = 0.0

    def add_overflow(self, name: str, count: int, peak: float) -> None:
        if self.overflow_tensor is None:
            self.overflow_tensor = name
        if name == self.overflow_tensor:  # its row blocks may come one by one
            self.overflow_peak = max(self.overflow_peak, peak)
        self.overflowed += count

    def add(self, base: torch.Tensor, target: torch.Tensor, rounded: torch.Tensor, base_rounded: torch.Tensor) -> None:
        step = sample_step(target.shape)
        self.add_sample(step, *(t[::step] for t in (base, target, rounded, base_rounded)))

    def add_sample(self, step: int, base: torch.Tensor, target: torch.Tensor, rounded: torch.Tensor, base_rounded: torch.Tensor) -> None:
        """Add every `step`-th row of a tensor (rows 0, step, 2·step, ...), weighted by step."""
        diff = (target - base).reshape(-1)
        error = (rounded.float() - target).reshape(-1)
        changed = int(torch.count_nonzero(diff))
        # An element that kept a change after rounding was changed, so the two counts nest.
        self.changed += step * changed
        self.swallowed += step * (changed - int(torch.count_nonzero(rounded != base_rounded)))
        self.change_norm_sq += step * float(torch.dot(diff, diff))
        self.error_norm_sq += step * float(torch.dot(error, error))

    def include(self, other: "RoundingReport") -> None:
        """Add another report's counts and norms (e.g. of other row blocks of the same tensors)."""
        self.changed += other.changed
        self.swallowed += other.swallowed
        self.change_norm_sq += other.change_norm_sq
        self.error_norm_sq += other.error_norm_sq
        if other.overflowed:
            self.add_overflow(other.overflow_tensor, other.overflowed, other.overflow_peak)

    @property
    def swallowed_share(self) -> float:
        return self.swallowed / self.changed if self.changed else 0.0

    @property
    def relative_error(self) -> float:
        """‖round(W') − W'‖ / ‖W' − W‖: the share of the change that rounding lost or distorted."""
        return math.sqrt(self.error_norm_sq / self.change_norm_sq) if self.change_norm_sq else 0.0

    def summary(self, dtype: str) -> str:
        overflow = f"; {self.overflowed:.0f} values overflowed to inf" if self.overflowed else ""
        return (
            f"rounding to {dtype}: {self.swallowed_share:.1%} of changed elements rounded back to the base value; "
            f"relative error of the change {self.relative_error:.2%}{overflow}"
        )


def sample_step(shape: Sequence[int]) -> int:
    """Every how many rows the rounding statistics of a tensor of this shape look (1: all of it)."""
    return max(1, math.prod(shape) // SAMPLE_ELEMENTS) if len(shape) > 1 else 1


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


def _return_freed_memory() -> None:
    """Give the heap's free memory back to the system once the stream is done (malloc_trim): the thresholds
    above keep it for reuse during the merge, not for the rest of the caller's process."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class _PhaseClock:
    """Busy seconds per phase (read / compute / write; they overlap, and several writers add up), for the
    report and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds


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
    ordered = [t for tensors in plan.shards.values() for t in tensors]
    computed = [t for t in ordered if _needs_read(t, edits)]
    clock = _PhaseClock()
    largest = max([max(t.source.nbytes, t.nbytes) for t in computed] + [t.nbytes for t in plan.added], default=0)
    # On a GPU, page-locked buffers make host↔device copies fast: one for reads, two pieces per output's writer.
    cuda = device.type == "cuda"
    read_pinned = torch.empty(largest, dtype=torch.uint8, pin_memory=True) if cuda else None
    stagings_pinned = [torch.empty(min(largest, 2 * STAGE_PIECE), dtype=torch.uint8, pin_memory=True) if cuda else None for _ in results]
    total = sum(_read_bytes(t) for t in ordered)
    opened: list[ShardWriter] = []
    with (
        # about what can be in flight (queued reads and writes, and the tensor being computed): little churn
        _cpu_buffers(device, PREFETCH_BYTES + WRITE_BYTES + 3 * largest) as buffers,
        ThreadPoolExecutor(1, "weightsteer-read") as reader,
        ThreadPoolExecutor(READS_IN_FLIGHT, "weightsteer-read-chunk") as chunks,
        _WriteLanes(len(results)) as writes,
        _compute_workers(device) as workers,
        ReadAhead([t.source for t in ordered if not isinstance(t, NewTensor)]) as read_ahead,
        tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress) as bar,
    ):
        into = (lambda t: read_pinned) if buffers is None else (lambda t: buffers.take(t.source.nbytes))

        def fetch(tensor: OutputTensor) -> "torch.Tensor | _RowFactors":
            factors = _streamed_factors(tensor, edits.get(tensor.name), device, clock)
            return _read(plan, tensor, device, clock, into(tensor), chunks) if factors is None else factors

        reads = _Prefetch(reader, computed, fetch)
        try:
            for shard, tensors in plan.shards.items():
                layout = [(t.name, t.dtype, t.shape) for t in tensors]
                metadata = {**plan.checkpoint.shard_metadata[shard], "format": "pt"}
                shard_writers = [ShardWriter(staging / shard, layout, metadata) for staging in stagings]
                opened += shard_writers
                for tensor in tensors:
                    if isinstance(tensor, NewTensor) or _needs_read(tensor, edits):
                        # a NewTensor is a change to an all-zero base tensor
                        stored = _zeros(tensor, device) if isinstance(tensor, NewTensor) else reads.next()
                        if isinstance(stored, _RowFactors):  # from the base file into the output files, block by block
                            _low_rank_streamed(tensor, stored, edits[tensor.name], results, shard_writers, workers, clock)
                        else:
                            outputs = _outputs(tensor, edits.get(tensor.name), stored, results, clock, workers, buffers)
                            if buffers is not None and all(o.data_ptr() != stored.data_ptr() for o in outputs):
                                buffers.give([stored])  # else an output is the stored tensor: recycled once written
                            nbytes = sum(o.numel() * o.element_size() for o in outputs)
                            writes.submit(nbytes, _writes(shard_writers, tensor.name, outputs, clock, stagings_pinned, buffers))
                    else:
                        writes.submit(0, [partial(_copy, w, tensor, clock) for w in shard_writers])
                    read_ahead.consumed(_read_bytes(tensor))
                    bar.update(_read_bytes(tensor))
                writes.submit(0, [w.close for w in shard_writers])
            writes.drain()
        except BaseException:
            writes.cancel()
            for shard_writer in opened:
                shard_writer.abort()
            raise
    for result in results:
        result.seconds = dict(clock.seconds)


@contextmanager
def _cpu_buffers(device: torch.device, limit: int):
    """Recycled buffers for a CPU stream (None on a GPU); their memory goes back to the system at the end, on
    failure too (a traceback kept in a notebook would otherwise hold them)."""
    if device.type != "cpu":
        yield None
        return
    buffers = _Buffers(limit)
    try:
        yield buffers
    finally:
        buffers.clear()
        _return_freed_memory()


@contextmanager
def _compute_workers(device: torch.device):
    """On a CPU, up to MAX_COMPUTE_WORKERS threads share each tensor's row blocks, each with single-threaded
    torch ops (the setting is per thread), and the caller's thread is single-threaded too while they run,
    except for the full-tensor path (`_all_threads`). Small ops on several OpenMP threads spend their time in
    barriers and spinning: on a loaded 2-core machine 100 µs ops ran 10-20× slower on two OpenMP threads than
    on one; on the 16-core GPU machine (8B shape) the caller's thread computing on 16 OpenMP threads took
    13.9 s and 190 CPU-seconds against 8.3 s and 20 with 4 workers, and 8 workers took 12.0 s, 16 workers
    15.5 s (2¹⁸-element blocks: each worker's Python between ops holds the GIL); with 2²⁰-element blocks, 4
    workers 6.9 s, 8 workers 7.3 s. On a GPU the caller's thread computes; yields None then."""
    threads = torch.get_num_threads()
    count = COMPUTE_WORKERS if COMPUTE_WORKERS is not None else min(threads, MAX_COMPUTE_WORKERS)
    if device.type != "cpu" or count < 1:
        yield None
        return
    with _Workers(count, threads) as pool:
        torch.set_num_threads(1)
        try:
            yield pool
        finally:
            torch.set_num_threads(threads)


class _Workers(ThreadPoolExecutor):
    """Compute threads with single-threaded torch ops; remembers the caller's thread count (`_all_threads`)."""

    def __init__(self, count: int, caller_threads: int):
        super().__init__(count, "weightsteer-compute", initializer=torch.set_num_threads, initargs=(1,))
        self.caller_threads = caller_threads


@contextmanager
def _all_threads(workers: "_Workers | None"):
    """The caller's torch threads back, while the workers wait, for a whole-tensor computation (families
    without low-rank factors): its few large ops gain from all of them."""
    if workers is None:
        yield
        return
    torch.set_num_threads(workers.caller_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


MAX_COMPUTE_WORKERS = 4  # compute threads on a CPU (see _compute_workers)
COMPUTE_WORKERS: int | None = None  # None: min(intra-op threads, MAX_COMPUTE_WORKERS); 0: the caller's thread; n: n workers


# Memory is bounded by bytes, not by model size: a few tensors in flight whatever the checkpoint.
PREFETCH_BYTES = 64 << 20  # tensors read ahead of the compute (always at least one)
WRITE_BYTES = 64 << 20  # computed bytes waiting for the writers (always at least one tensor)
READS_IN_FLIGHT = 4  # chunk reads of one large tensor issued at once (keeps an NVMe queue busy)
READ_AHEAD_BYTES = 1 << 30  # the kernel is asked to read this far past the compute (page cache, not RSS)
ADVISE_BYTES = 64 << 20  # one posix_fadvise(WILLNEED) request


class _Prefetch:
    """Runs `read` on the given items in order on one thread, up to PREFETCH_BYTES ahead of the consumer;
    it never waits for a write."""

    def __init__(self, pool: ThreadPoolExecutor, items: list[OutputTensor], read):
        self._pending: deque[tuple[int, Future]] = deque()
        self._items = iter(items)
        self._pool, self._read = pool, read
        self._fill()

    def _fill(self) -> None:
        while not self._pending or sum(n for n, _ in self._pending) < PREFETCH_BYTES:
            item = next(self._items, None)
            if item is None:
                return
            self._pending.append((item.source.nbytes, self._pool.submit(self._read, item)))

    def next(self):
        result = self._pending.popleft()[1].result()
        self._fill()
        return result


class _WriteLanes:
    """One writer thread per output, each writing its own shard files in submission order, so the K outputs
    of one read are written in parallel; the caller blocks while more than WRITE_BYTES are pending (at least
    one tensor's writes always may be)."""

    def __init__(self, count: int):
        self._lanes = [ThreadPoolExecutor(1, f"weightsteer-write-{k}") for k in range(count)]
        self._pending: deque[tuple[int, list[Future]]] = deque()

    def __enter__(self) -> "_WriteLanes":
        return self

    def __exit__(self, *exc) -> None:
        for lane in self._lanes:
            lane.shutdown()

    def submit(self, nbytes: int, jobs: Sequence[Callable[[], None]]) -> None:
        """Queue one tensor's writes, a job per output (lane)."""
        self._pending.append((nbytes, [lane.submit(job) for lane, job in zip(self._lanes, jobs)]))
        while len(self._pending) > 1 and sum(n for n, _ in self._pending) > WRITE_BYTES:
            self._finish_first()
        while self._pending and all(f.done() for f in self._pending[0][1]):
            self._finish_first()

    def drain(self) -> None:
        while self._pending:
            self._finish_first()

    def cancel(self) -> None:
        for lane in self._lanes:
            lane.shutdown(cancel_futures=True)

    def _finish_first(self) -> None:
        for future in self._pending.popleft()[1]:
            future.result()


class _Buffers:
    """CPU memory for read tensors and computed outputs, recycled once their bytes are written.

    A fresh allocation per tensor costs page faults and zero-filling each time. Buffers are anonymous
    memory maps, not heap blocks: a buffer let go returns its memory at once, where the heap, holding
    blocks of several sizes freed in whatever order the threads finish, grew past what was in use
    (16-core machine, 8B shape: peak RSS 1.39-1.88 GB from heap buffers). The pool holds at most `limit`
    bytes, lent and idle together, unless more are lent at once: to make a buffer that no idle one fits,
    it first lets idle buffers go, the largest first. A buffer is reused for a tensor of at least half
    its size."""

    def __init__(self, limit: int):
        self._limit = limit
        self._idle: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr → whole buffer
        self._held = 0  # bytes of every buffer, lent or idle
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes` (a view of the start of a buffer)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._idle) if nbytes <= b.numel() <= 2 * nbytes]
            if fits:
                whole = self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
            else:
                self._idle.sort(key=torch.Tensor.numel)
                while self._idle and self._held + nbytes > self._limit:
                    self._held -= self._idle.pop().numel()
                whole = _mapped(nbytes)
                self._held += nbytes
            self._lent[whole.data_ptr()] = whole
        return whole[:nbytes]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._lent.clear()
            self._held = 0

    def give(self, tensors: Sequence[torch.Tensor]) -> None:
        """Take back the buffers of these tensors (views of taken buffers; others, and repeats, are ignored)."""
        with self._lock:
            for tensor in tensors:
                whole = self._lent.pop(tensor.data_ptr(), None)
                if whole is not None:
                    self._idle.append(whole)


def _mapped(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over fresh anonymous memory, unmapped when the last tensor viewing it is freed. Private,
    not Python's default shared mapping (shmem): its pages fault in about 25 % faster."""
    private = getattr(mmap, "MAP_PRIVATE", 0)  # Windows' mmap has no flags
    region = mmap.mmap(-1, max(1, nbytes), flags=private) if private else mmap.mmap(-1, max(1, nbytes))
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


class ReadAhead:
    """Asks the kernel to read the checkpoint's bytes in stream order, up to READ_AHEAD_BYTES past what
    the engine has consumed (posix_fadvise WILLNEED, from its own thread: the request may block while the
    disk queue is full). On a cold page cache this keeps the disk busy while the engine computes and writes;
    on a warm one it costs a few system calls."""

    def __init__(self, infos: Sequence[TensorInfo]):
        self._requests = list(_advise_requests(infos))
        self._consumed = 0
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="weightsteer-read-ahead", daemon=True)

    def __enter__(self) -> "ReadAhead":
        if hasattr(os, "posix_fadvise") and self._requests:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def consumed(self, nbytes: int) -> None:
        with self._wake:
            self._consumed += nbytes
            self._wake.notify()

    def _wait_for_room(self, advised: int) -> bool:
        """Wait until `advised` is less than READ_AHEAD_BYTES past the consumer; False once closed."""
        with self._wake:
            self._wake.wait_for(lambda: self._closed or advised - self._consumed < READ_AHEAD_BYTES)
            return not self._closed

    def _run(self) -> None:
        files: dict[Path, int] = {}
        advised = 0
        try:
            for path, start, length in self._requests:
                if not self._wait_for_room(advised):
                    return
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(files[path], start, length, os.POSIX_FADV_WILLNEED)
                advised += length
        except OSError:
            return  # a hint only: reads still work without it
        finally:
            for fd in files.values():
                os.close(fd)


def _advise_requests(infos: Sequence[TensorInfo]):
    """(file, start, length) in stream order: adjacent tensors merged, cut into ADVISE_BYTES pieces."""
    spans: list[list] = []
    for info in infos:
        if spans and spans[-1][0] == info.file and spans[-1][1] + spans[-1][2] == info.start:
            spans[-1][2] += info.nbytes
        else:
            spans.append([info.file, info.start, info.nbytes])
    for path, start, length in spans:
        for offset in range(0, length, ADVISE_BYTES):
            yield path, start + offset, min(ADVISE_BYTES, length - offset)


def _read_bytes(tensor: OutputTensor | NewTensor) -> int:
    return 0 if isinstance(tensor, NewTensor) else tensor.source.nbytes


def _zeros(tensor: NewTensor, device: torch.device) -> torch.Tensor:
    """The base a new tensor is computed from, as _read gives it: zeros as stored (in the output dtype)."""
    return torch.zeros(tensor.shape, dtype=DTYPES[tensor.dtype], device=device)


def _needs_read(tensor: OutputTensor | NewTensor, edits: dict[str, list[Edit | None]]) -> bool:
    if isinstance(tensor, NewTensor):
        return False
    edited = any(edit is not None for edit in edits.get(tensor.name, ()))
    return edited or tensor.dtype != tensor.source.dtype


def _read(
    plan: MergePlan, tensor: OutputTensor, device: torch.device, clock: _PhaseClock, into: torch.Tensor | None, chunks
) -> torch.Tensor:
    """The stored tensor on the compute device, as stored (the compute converts it block by block), read into
    `into`: on a GPU the page-locked buffer, free again on return (the copy to the GPU is synchronous); on a
    CPU a recycled buffer (_Buffers), which the result is a view of."""
    with clock("read"):
        return plan.checkpoint.read(tensor.source.name, into=into, pool=chunks).to(device)


def _outputs(
    tensor: OutputTensor,
    edits: list[Edit | None] | None,
    stored: torch.Tensor,
    results: Sequence[StreamTarget],
    clock: _PhaseClock,
    workers: "_Workers | None",
    buffers: "_Buffers | None",
) -> list[torch.Tensor]:
    """One output tensor per result, each rounded once from fp32 to the output dtype; updates the reports."""
    dtype = DTYPES[tensor.dtype]
    with clock("compute"):
        edited = [(edit, result) for edit, result in zip(edits or [None] * len(results), results) if edit is not None]
        # Row blocks only below fp32: the factors' arithmetic (e.g. LoRA's (s·B) A for weight()'s s·(B A)) may
        # differ in the last fp32 bit, which an fp32 output keeps and rounding to bf16/fp16 absorbs; an fp32
        # output also needs no conversion, the blocks' main saving.
        factors = [_row_factors(edit, tuple(stored.shape), stored.device) if dtype.itemsize < 4 else None for edit, _ in edited]
        base_rounded = None
        if edited and all(f is not None for f in factors):
            merged = _low_rank_blocked(tensor, stored, factors, *zip(*edited), dtype, workers, buffers)
        else:
            with _all_threads(workers):
                base = stored.float()
                base_rounded = stored.to(dtype)
                merged = [_merged(tensor, edit, base, base_rounded, result) for edit, result in edited]
        by_result = {id(result): output for (_, result), output in zip(edited, merged)}
        if len(by_result) < len(results) and base_rounded is None:
            base_rounded = stored.to(dtype)
        return [by_result.get(id(result), base_rounded) for result in results]


def _writes(
    writers: Sequence[ShardWriter],
    name: str,
    outputs: Sequence[torch.Tensor],
    clock: _PhaseClock,
    stagings: Sequence[torch.Tensor | None],
    buffers: "_Buffers | None",
) -> list[Callable[[], None]]:
    """One job per output writing its tensor; whichever finishes last recycles the buffers (outputs may share one)."""
    left = [len(outputs)]
    lock = threading.Lock()

    def write(writer: ShardWriter, output: torch.Tensor, staging: torch.Tensor | None) -> None:
        with clock("write"):
            writer.write(name, output, staging)
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and buffers is not None:
            buffers.give(outputs)

    return [partial(write, *job) for job in zip(writers, outputs, stagings)]


def _copy(writer: ShardWriter, tensor: OutputTensor, clock: _PhaseClock) -> None:
    with clock("write"):
        writer.copy(tensor.name, tensor.source)


def _merged(tensor: OutputTensor, edit: Edit, base: torch.Tensor, base_rounded: torch.Tensor, result: StreamTarget) -> torch.Tensor:
    """The edited tensor (every step of the output's composition), rounded once to the output dtype; updates the report."""
    target = edit(base)
    may_overflow = _check_finite(tensor, edit, target, base_rounded.dtype)
    rounded = target.to(base_rounded.dtype)
    if target.shape != base.shape:  # added token rows have no base value: the report leaves them out
        base, base_rounded = (torch.cat([t, r[t.shape[0] :]]) for t, r in ((base, target), (base_rounded, rounded)))
    if may_overflow:
        _count_overflow(tensor, target, rounded, base_rounded, result.rounding)
    before = result.rounding.changed
    result.rounding.add(base, target, rounded, base_rounded)
    if result.rounding.changed > before or not torch.equal(target, base):
        result.changed_tensors.append(tensor.name)
    fault_point("streaming")
    return rounded


def _count_overflow(
    tensor: OutputTensor, target: torch.Tensor, rounded: torch.Tensor, base_rounded: torch.Tensor, report: RoundingReport
) -> None:
    """Count the values of the (finite) fp32 target that became ±inf when rounded to the output dtype; they are put
    back to the base's in `rounded` (in place) so that the statistics stay finite: the output is refused later."""
    infinite = torch.isinf(rounded)
    overflowed = int(infinite.sum())  # target is finite: every inf is an overflow
    if overflowed:
        report.add_overflow(tensor.name, overflowed, float(target.abs().max()))
        rounded.copy_(torch.where(infinite, base_rounded.to(rounded.dtype), rounded))


def _check_finite(tensor: OutputTensor, edit: Edit, target: torch.Tensor, dtype: torch.dtype) -> bool:
    """Refuse a target holding NaN or inf; say whether rounding it to `dtype` may overflow (then
    _count_overflow counts exactly). One pass in the common case: every |t_i| ≤ ‖t‖₂, so finite norms within
    half of dtype's range rule out both; only otherwise do the exact element-wise checks run. The norms are
    taken over pieces of at most NORM_PIECE = n elements: in any summation order an fp32 sum of n non-negative
    rounded squares is at least (1 − u)ⁿ ≥ e^(−1/2) of the exact one (u = 2⁻²⁴; Higham, Accuracy and
    Stability of Numerical Algorithms, §4.2), so a computed norm within half the range puts the exact one
    within 0.65 of it: the half is a bound, not a heuristic."""
    flat = target.reshape(-1)
    if flat.numel() <= NORM_PIECE:  # a row block: one dot, no generator (this runs for every block)
        norm_sq = float(torch.dot(flat, flat))
    else:
        norm_sq = max(float(torch.dot(piece, piece)) for piece in flat.split(NORM_PIECE))
    limit = _largest(dtype)
    if math.sqrt(norm_sq) <= limit / 2:  # False for NaN and inf
        return False
    if not bool(torch.isfinite(target).all()):
        coeffs = ", ".join(f"{step.coeff:g}" for step in edit.steps)
        raise AdapterError(
            f"Merging {tensor.name} at coeff {coeffs} gives NaN or inf even in float32; check the adapters and coeffs."
        )
    return limit < torch.finfo(torch.float32).max


NORM_PIECE = 1 << 23  # n·u = 1/2


@cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if dtype.is_floating_point else math.inf


# ---- low-rank changes in row blocks ---------------------------------------------------------------
# W' = W + L R (L: rows × r, R: r × cols) touches each element once: a block of rows is converted to fp32,
# updated and rounded into the output while it sits in the CPU cache, instead of full-size fp32 passes
# (convert, add, check, round) over main memory; on a CPU the block is also read from the base file and
# written to the outputs from the cache. Row i of W' depends on row i of W and of L only, so the blocked
# result is the unblocked formula's, element for element.

CPU_BLOCK_ELEMENTS: int | None = None  # None: from the size of a core's L2 cache (cpu_block_elements)
GPU_BLOCK_ELEMENTS = 1 << 28  # on a GPU every tensor of a real model is one block
MIN_BLOCK_ROWS = 8  # a matrix product over fewer rows may take another kernel (e.g. one row: gemv)


def _row_factors(edit: Edit, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R) with edit(W) = W + L R for a stored W of this shape, where the edit is one adapter's change and
    the family's change at that coeff is an exact product of small factors (AdapterFamily.low_rank);
    None otherwise (compositions of several steps take the full-tensor path)."""
    if len(edit.steps) != 1 or len(shape) != 2:
        return None
    step = edit.steps[0]
    change = step.change
    if change.part != "weight" or step.scheme.apply is None:
        return None
    transposed = change.state.fan_in_fan_out
    factors = change.family.low_rank(step.scheme.apply(change.state, step.coeff), shape[::-1] if transposed else shape)
    if factors is None:
        return None
    left, right = factors
    if transposed:  # (W_lin + B A)ᵀ = W + Aᵀ Bᵀ
        left, right = right.T, left.T
    rank = left.shape[-1]
    if left.shape != (shape[0], rank) or right.shape != (rank, shape[1]):
        return None
    return left.to(device, torch.float32).contiguous(), right.to(device, torch.float32).contiguous()


@dataclass
class _RowFactors:
    """What the reader hands over for a tensor computed from its file block by block instead of its bytes:
    each output's (L, R) with W' = W + L R."""

    factors: list[tuple[torch.Tensor, torch.Tensor]]


def _streamed_factors(
    tensor: OutputTensor, edits: list[Edit | None] | None, device: torch.device, clock: _PhaseClock
) -> _RowFactors | None:
    """On a CPU, a tensor every output changes by an exact low-rank product (rounded below fp32, shape kept) is
    read, computed and written a row block at a time by the compute threads: each block's bytes are converted
    while still in the CPU cache after their read, and written from it after their rounding, where whole
    tensors made two trips through main memory (read into a buffer, converted from it; rounded into one,
    written from it). Measured on the 2-core machine (~0.8B fixture, five interleaved rounds in one process):
    1.61-1.74 s and 2.8-3.0 CPU-seconds, against 1.90-2.49 s and 3.2-4.1 with whole tensors."""
    shape = tuple(tensor.source.shape)
    if device.type != "cpu" or not edits or any(e is None for e in edits) or DTYPES[tensor.dtype].itemsize >= 4:
        return None
    if tuple(tensor.shape) != shape or tensor.source.dtype not in FLOAT_CODES:
        return None
    with clock("compute"):
        factors = [_row_factors(edit, shape, device) for edit in edits]
    return None if any(f is None for f in factors) else _RowFactors(factors)


def row_blocks(rows: int, cols: int, device: torch.device, workers: ThreadPoolExecutor | None = None) -> list[tuple[int, int]]:
    """Row ranges of about a block's elements each, none under MIN_BLOCK_ROWS rows (unless the tensor is).
    A block computed on the caller's CPU thread (no workers) is shared among torch's intra-op threads: one
    block's worth per thread."""
    if device.type == "cuda":
        elements = GPU_BLOCK_ELEMENTS
    elif workers is not None:
        elements = cpu_block_elements()
    else:
        elements = cpu_block_elements() * torch.get_num_threads()
    count = max(1, min(rows // MIN_BLOCK_ROWS, rows * cols // elements))
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def cpu_block_elements() -> int:
    """Elements of one CPU row block: a power of two between 2¹⁷ and 2²⁰, half the bytes of a core's L2
    cache; 2²⁰ where the cache size is unknown. Smaller blocks cost more Python steps a byte (the GIL),
    larger ones spill the block's fp32 rows out of the L2. Calibrated on the ~0.8B fixture with two workers:
    512 KiB L2, 8 MiB L3 (Zen 1, whole tensors read ahead): 2¹⁷ 1.72-1.83 s, 2¹⁸ 1.63-1.74 s,
    2¹⁹ 1.67-1.82 s, 2²⁰ 1.93-2.27 s; 512 KiB L2, 32 MiB L3 (Zen 3, blocks streamed from the file, five
    interleaved rounds): 2¹⁷ 1.74-2.08 s, 2¹⁸ 1.60-2.03 s, 2¹⁹ 1.75-1.96 s, 2²⁰ 2.11-2.61 s. On the 16-core
    machine (2 MiB L2, four workers; 8B shape with 8 layers, streamed): 2¹⁸ 2.03-2.23 s, 2¹⁹ 1.48-1.60 s,
    2²⁰ 1.41-1.44 s."""
    if CPU_BLOCK_ELEMENTS is not None:
        return CPU_BLOCK_ELEMENTS
    size = _core_cache_bytes(level=2)
    if size is None:
        return 1 << 20
    return 1 << max(17, min(20, (size // 2).bit_length() - 1))


@cache
def _core_cache_bytes(level: int) -> int | None:
    """Size of CPU 0's data or unified cache of this level, from Linux's sysfs; None where it cannot be read."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() != "Instruction" and int((index / "level").read_text()) == level:
                return _cache_bytes((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _cache_bytes(text: str) -> int:
    """sysfs's cache size ("512K", "32M", "1024") in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def _low_rank_blocked(
    tensor: OutputTensor,
    stored: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    edits: Sequence[Edit],
    results: Sequence[StreamTarget],
    dtype: torch.dtype,
    workers: ThreadPoolExecutor | None,
    buffers: "_Buffers | None" = None,
) -> list[torch.Tensor]:
    """W + L R for each result's factors, from a stored tensor in memory, rounded once into new tensors."""
    rows, cols = stored.shape
    blocks = row_blocks(rows, cols, stored.device, workers)
    nbytes = stored.numel() * dtype.itemsize
    if buffers is None:
        outputs = [torch.empty(stored.shape, dtype=dtype, device=stored.device) for _ in results]
    else:
        outputs = [buffers.take(nbytes).view(dtype).reshape(stored.shape) for _ in results]
    sinks = [_MemoryRows(output, blocks) for output in outputs]
    _update_in_blocks(tensor, blocks, _MemoryRows(stored, blocks), sinks, factors, edits, results, dtype, workers)
    return outputs


def _low_rank_streamed(
    tensor: OutputTensor,
    streamed: _RowFactors,
    edits: Sequence[Edit],
    results: Sequence[StreamTarget],
    writers: Sequence[ShardWriter],
    workers: ThreadPoolExecutor | None,
    clock: _PhaseClock,
) -> None:
    """W + L R for each result's factors, read from the base file and written into each output's shard a row
    block at a time (see _streamed_factors)."""
    dtype = DTYPES[tensor.dtype]
    rows, cols = tensor.source.shape
    blocks = row_blocks(rows, cols, torch.device("cpu"), workers)
    with clock("compute"), _FileRows(tensor.source, blocks, clock) as source:
        sinks = [_FileOutput(writer, tensor.name, blocks, cols, dtype, clock) for writer in writers]
        _update_in_blocks(tensor, blocks, source, sinks, streamed.factors, edits, results, dtype, workers)


class _MemoryRows:
    """A 2-D tensor in memory, block by block: the stored tensor read whole, or an output tensor."""

    def __init__(self, tensor: torch.Tensor, blocks: Sequence[tuple[int, int]]):
        self.shape, self.device = tuple(tensor.shape), tensor.device
        self._blocks = tensor.split([end - start for start, end in blocks])

    def scratch(self) -> None:
        return None

    def block(self, i: int, scratch: None) -> torch.Tensor:
        """Block i's rows (to read from, or as an output, to round into)."""
        return self._blocks[i]

    read = block

    def written(self, i: int, scratch: None) -> None:
        pass


class _FileRows:
    """A stored 2-D tensor's rows, read block by block from its file into the computing thread's scratch."""

    def __init__(self, info: TensorInfo, blocks: Sequence[tuple[int, int]], clock: _PhaseClock):
        self.shape, self.device = info.shape, torch.device("cpu")
        self._info, self._blocks, self._clock = info, blocks, clock
        self._row_bytes = info.nbytes // max(1, info.shape[0])
        self._fd: int | None = None

    def __enter__(self) -> "_FileRows":
        self._fd = os.open(self._info.file, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def scratch(self) -> tuple[torch.Tensor, memoryview]:
        """A block's worth of memory, as a tensor and as bytes (made once per thread: each costs microseconds)."""
        return _scratch(max(end - start for start, end in self._blocks), self.shape[1], self._info.torch_dtype)

    def read(self, i: int, scratch: tuple[torch.Tensor, memoryview]) -> torch.Tensor:
        start, end = self._blocks[i]
        began = time.perf_counter()
        read_part(self._fd, self._info, scratch[1][: (end - start) * self._row_bytes], start * self._row_bytes)
        self._clock.add("read", time.perf_counter() - began)
        return scratch[0][: end - start]


class _FileOutput:
    """One output's tensor, rounded block by block into the computing thread's scratch and written from there
    to its place in the output's shard file."""

    def __init__(self, writer: ShardWriter, name: str, blocks: Sequence[tuple[int, int]], cols: int, dtype: torch.dtype, clock: _PhaseClock):
        self._writer, self._name, self._blocks, self._cols, self._dtype, self._clock = writer, name, blocks, cols, dtype, clock
        self._row_bytes = cols * dtype.itemsize

    def scratch(self) -> tuple[torch.Tensor, memoryview]:
        return _scratch(max(end - start for start, end in self._blocks), self._cols, self._dtype)

    def block(self, i: int, scratch: tuple[torch.Tensor, memoryview]) -> torch.Tensor:
        start, end = self._blocks[i]
        return scratch[0][: end - start]

    def written(self, i: int, scratch: tuple[torch.Tensor, memoryview]) -> None:
        start, end = self._blocks[i]
        began = time.perf_counter()
        self._writer.write_part(self._name, start * self._row_bytes, scratch[1][: (end - start) * self._row_bytes])
        self._clock.add("write", time.perf_counter() - began)


def _scratch(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, memoryview]:
    tensor = torch.empty(rows, cols, dtype=dtype)
    return tensor, memoryview(tensor.view(-1).view(torch.uint8).numpy())


def _update_in_blocks(
    tensor: OutputTensor,
    blocks: Sequence[tuple[int, int]],
    source: "_MemoryRows | _FileRows",
    sinks: "Sequence[_MemoryRows | _FileOutput]",
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    edits: Sequence[Edit],
    results: Sequence[StreamTarget],
    dtype: torch.dtype,
    workers: ThreadPoolExecutor | None,
) -> None:
    """Each sink gets W + L R for its result's factors, a row block at a time from the source, rounded once.

    On a CPU the blocks go to `workers`, threads whose torch ops run single-threaded (see
    `_compute_workers`), each taking the next block when it is free: a worker slowed by the reader or the
    writer on a shared core holds up at most one block. The rounding report samples the tensor's rows
    0, step, 2·step, ...: the blocks copy their sampled rows (base, target, output) aside as they pass, and
    the statistics are taken once at the end."""
    rows, cols = source.shape
    device = source.device
    step = sample_step((rows, cols))
    sizes = [end - start for start, end in blocks]
    firsts = [-start % step for start, _ in blocks]  # each block's first sampled row
    counts = [len(range(first, size, step)) for first, size in zip(firsts, sizes)]
    sampled = len(range(0, rows, step))
    base_sample, base_rounded_sample = torch.empty(sampled, cols, device=device), torch.empty(sampled, cols, dtype=dtype, device=device)
    target_samples = [torch.empty(sampled, cols, device=device) for _ in results]
    output_samples = [torch.empty(sampled, cols, dtype=dtype, device=device) for _ in results]
    # Every block's views in one call per tensor: a Python slice costs microseconds, a block's math a few hundred.
    base_sample_blocks, base_rounded_blocks = base_sample.split(counts), base_rounded_sample.split(counts)
    target_sample_blocks = [sample.split(counts) for sample in target_samples]
    output_sample_blocks = [sample.split(counts) for sample in output_samples]
    left_blocks = [left.split(sizes) for left, _ in factors]
    pending = iter(range(len(blocks)))
    taking = threading.Lock()
    failed: list[bool] = []

    def next_block() -> int | None:
        with taking:
            return None if failed else next(pending, None)

    def update() -> list[RoundingReport]:
        """Compute blocks until none is left; per result, the overflows this thread counted."""
        target_block = torch.empty(max(sizes), cols, device=device)
        targets = {size: target_block[:size] for size in set(sizes)}  # at most two sizes
        stored_scratch, output_scratch = source.scratch(), sinks[0].scratch()
        overflows = [RoundingReport() for _ in results]
        try:
            while (i := next_block()) is not None:
                stored, target, first = source.read(i, stored_scratch), targets[sizes[i]], firsts[i]
                if counts[i]:
                    base_sample_blocks[i].copy_(stored[first::step])
                    base_rounded_blocks[i].copy_(stored[first::step])
                for k, (edit, (_, right), sink) in enumerate(zip(edits, factors, sinks)):
                    # convert into the fp32 block, then W += L R in place (beta = 1: no copy of the block)
                    target.copy_(stored).addmm_(left_blocks[k][i], right)
                    may_overflow = _check_finite(tensor, edit, target, dtype)
                    output = sink.block(i, output_scratch)
                    output.copy_(target)
                    if may_overflow:
                        _count_overflow(tensor, target, output, stored, overflows[k])
                    if counts[i]:
                        target_sample_blocks[k][i].copy_(target[first::step])
                        output_sample_blocks[k][i].copy_(output[first::step])
                    sink.written(i, output_scratch)
        except BaseException:
            failed.append(True)  # the other threads stop at their next block
            raise
        return overflows

    if workers is None:
        shares = [update()]
    else:
        running = [workers.submit(update) for _ in range(min(workers._max_workers, len(blocks)))]
        try:
            wait(running)  # every thread done with the files before a failure is raised
        except BaseException:  # e.g. Ctrl-C: stop the threads, and let them finish their block before the files close
            failed.append(True)
            wait(running)
            raise
        shares = [share.result() for share in running]
    for k, result in enumerate(results):
        before = result.rounding.changed
        for share in shares:
            result.rounding.include(share[k])
        result.rounding.add_sample(step, base_sample, target_samples[k], output_samples[k], base_rounded_sample)
        # Sampled rows that changed settle it; else (rare: a change too small for fp32 in every sampled row) look at all.
        if result.rounding.changed > before or _changes_any_row(source, blocks, *factors[k]):
            result.changed_tensors.append(tensor.name)


def _changes_any_row(
    source: "_MemoryRows | _FileRows", blocks: Sequence[tuple[int, int]], left: torch.Tensor, right: torch.Tensor
) -> bool:
    """Whether W + L R differs from W in fp32 anywhere, recomputed block by block as `update` computes it."""
    scratch = source.scratch()
    for i, (start, end) in enumerate(blocks):
        base = source.read(i, scratch).float()
        if not torch.equal(base.clone().addmm_(left[start:end], right), base):
            return True
    return False
