"""The engine's I/O and compute paths: chunked reads with several in flight, kernel read-ahead, row-block
low-rank updates, byte-bounded queues. Oracles: the safetensors library's own reader, the unblocked fp32
formula W + L R rounded once, hand-written rounding statistics, and PEFT's DeLoRA delta."""

from __future__ import annotations

import dataclasses
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from peft import DeloraConfig, PeftModel
from safetensors.torch import load_file, save_file

import weightsteer
from weightsteer import checkpoint, engine
from weightsteer.checkpoint import read_header, read_tensor
from weightsteer.engine import RoundingReport, row_blocks

from conftest import assert_base_identical, assert_matches_runtime, build_base, load_base, make_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_chunked_reads_in_flight_return_the_stored_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "READ_CHUNK", 1000)  # many pieces per tensor
    tensors = {"a": torch.randn(300, 17), "b": torch.randn(5).bfloat16(), "c": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, tmp_path / "m.safetensors")
    expected = load_file(tmp_path / "m.safetensors")
    _, infos = read_header(tmp_path / "m.safetensors")
    with ThreadPoolExecutor(4) as pool:
        for info in infos:
            assert torch.equal(read_tensor(info, pool=pool), expected[info.name]), info.name
            assert torch.equal(read_tensor(info, into=torch.empty(1 << 16, dtype=torch.uint8), pool=pool), expected[info.name])
        truncated = tmp_path / "cut.safetensors"  # cut after its header was read (read_header refuses it already)
        truncated.write_bytes((tmp_path / "m.safetensors").read_bytes()[:-100])
        last = dataclasses.replace(max(infos, key=lambda i: i.start), file=truncated)
        with pytest.raises(weightsteer.BaseModelError, match="truncated"):
            read_tensor(last, pool=pool)


def test_read_ahead_asks_for_every_byte_once_and_stops_when_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "ADVISE_BYTES", 1000)
    save_file({"a": torch.randn(1000), "b": torch.randn(10), "c": torch.randn(700)}, tmp_path / "m.safetensors")
    _, infos = read_header(tmp_path / "m.safetensors")
    requests = list(engine._advise_requests(infos))
    assert requests[0][1] == infos[0].start and all(length <= 1000 for _, _, length in requests)
    assert sum(length for _, _, length in requests) == sum(i.nbytes for i in infos)
    assert all(a[1] + a[2] == b[1] for a, b in zip(requests, requests[1:]))  # adjacent tensors: one sequential run
    monkeypatch.setattr(engine, "READ_AHEAD_BYTES", 1)  # the thread waits for the consumer after one request
    with engine.ReadAhead(infos) as ahead:
        ahead.consumed(infos[0].nbytes)
    assert not ahead._thread.is_alive()


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 333, 4096])
def test_row_blocks_cover_every_row_in_blocks_of_at_least_eight(rows, monkeypatch):
    monkeypatch.setattr(engine, "CPU_BLOCK_ELEMENTS", 64)
    blocks = row_blocks(rows, 16, torch.device("cpu"))
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(end - start >= min(rows, engine.MIN_BLOCK_ROWS) for start, end in blocks)


def _one_step(coeff: float) -> SimpleNamespace:
    """What the blocked path reads of an Edit: its steps' coeffs (for the error message)."""
    return SimpleNamespace(steps=(SimpleNamespace(coeff=coeff),))


def _stats_by_hand(base: torch.Tensor, target: torch.Tensor, rounded: torch.Tensor, step: int) -> tuple[float, float, float, float]:
    """Every step-th row, weighted by step (RoundingReport's documented estimate), in float64."""
    b, t, r = base[::step].double(), target[::step].double(), rounded[::step]
    diff, error = t - b, r.double() - t
    changed = int((diff != 0).sum())
    kept = int((r != base[::step].to(r.dtype)).sum())
    return step * changed, step * (changed - kept), step * float((diff**2).sum()), step * float((error**2).sum())


@pytest.mark.parametrize(
    "l2, log2",
    [
        (512 << 10, 18),  # the 2-core machines: half of 512 KiB, in bytes
        (2 << 20, 20),  # the H200 machine
        (1 << 20, 19),
        (256 << 10, 17),  # a small cache: not below 2¹⁷ (the loop's Python cost)
        (32 << 20, 20),  # capped
        (None, 20),  # unknown cache
    ],
)
def test_cpu_blocks_take_half_the_bytes_of_a_cores_l2_cache(l2, log2, monkeypatch):
    monkeypatch.setattr(engine, "_core_cache_bytes", lambda level: l2 if level == 2 else None)
    assert engine.cpu_block_elements() == 1 << log2


def test_cache_sizes_as_sysfs_writes_them():
    assert [engine._cache_bytes(text) for text in ("512K", "32M", "1G", "1024")] == [512 << 10, 32 << 20, 1 << 30, 1024]


@pytest.mark.parametrize("workers", [0, 1, 3])  # 0: blocks on the caller's thread
def test_row_block_update_is_the_unblocked_formula_bit_for_bit(workers, monkeypatch):
    monkeypatch.setattr(engine, "CPU_BLOCK_ELEMENTS", 96 * 10)  # ~10 rows per block: 33 blocks
    monkeypatch.setattr(engine, "SAMPLE_ELEMENTS", 2000)  # sampled statistics: every 15th row
    generator = torch.Generator().manual_seed(0)
    stored = (torch.randn(333, 96, generator=generator) * 0.02).bfloat16()
    factors = [(torch.randn(333, 4, generator=generator) * s, torch.randn(4, 96, generator=generator) * 1e-3) for s in (1.0, -0.01)]
    edits = [_one_step(c) for c in (1.0, -0.01)]
    results = [SimpleNamespace(rounding=RoundingReport(), changed_tensors=[]) for _ in edits]
    tensor = SimpleNamespace(name="w")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        outputs = engine._low_rank_blocked(tensor, stored, factors, edits, results, torch.bfloat16, pool if workers else None)
    step = 333 * 96 // 2000
    for (left, right), output, result in zip(factors, outputs, results):
        target = torch.addmm(stored.float(), left, right)
        assert torch.equal(output, target.to(torch.bfloat16))
        changed, swallowed, change_sq, error_sq = _stats_by_hand(stored.float(), target, output, step)
        assert (result.rounding.changed, result.rounding.swallowed) == (changed, swallowed)
        assert result.rounding.change_norm_sq == pytest.approx(change_sq, rel=1e-5)
        assert result.rounding.error_norm_sq == pytest.approx(error_sq, rel=1e-5)
        assert result.changed_tensors == ["w"]
    assert 0 < results[1].rounding.swallowed < results[1].rounding.changed  # the small change is partly swallowed


def test_non_finite_block_is_refused():
    stored = torch.zeros(64, 8, dtype=torch.bfloat16)
    left, right = torch.ones(64, 1), torch.full((1, 8), float("inf"))
    result = SimpleNamespace(rounding=RoundingReport(), changed_tensors=[])
    with ThreadPoolExecutor(2) as pool, pytest.raises(weightsteer.AdapterError, match="Merging w at coeff 2 gives NaN or inf"):
        engine._low_rank_blocked(SimpleNamespace(name="w"), stored, [(left, right)], [_one_step(2.0)], [result], torch.bfloat16, pool)


@pytest.mark.parametrize(
    ("values", "dtype", "may_overflow"),
    [
        ([0.5, -2.0, 3.0], torch.bfloat16, False),  # the common case: the norm rules out overflow
        ([40000.0, 1.0], torch.float16, True),  # above half of float16's range: counted exactly
        ([1e20, -1e20], torch.bfloat16, True),  # the sum of squares overflows float32; the values do not
        ([1e20, 1.0], torch.float32, False),  # a float32 output cannot overflow
    ],
)
def test_finite_check_takes_the_exact_path_whenever_the_norm_cannot_rule_overflow_out(values, dtype, may_overflow):
    target = torch.tensor(values)
    assert engine._check_finite(SimpleNamespace(name="w"), _one_step(1.0), target, dtype) is may_overflow
    rounded, report = target.to(dtype), RoundingReport()
    engine._count_overflow(SimpleNamespace(name="w"), target, rounded, target.to(dtype), report)
    assert report.overflowed == int(torch.isinf(target.to(dtype)).sum()) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_refuses_nan_and_inf(bad):
    with pytest.raises(weightsteer.AdapterError, match="gives NaN or inf even in float32"):
        engine._check_finite(SimpleNamespace(name="w"), _one_step(1.0), torch.tensor([1.0, bad]), torch.bfloat16)


def test_float16_values_past_the_range_are_counted_exactly():
    target = torch.tensor([65519.0, 65520.0, -70000.0, 1.0])  # 65519 rounds to 65504; 65520 and beyond to inf
    assert engine._check_finite(SimpleNamespace(name="w"), _one_step(1.0), target, torch.float16)
    rounded, report = target.to(torch.float16), RoundingReport()
    engine._count_overflow(SimpleNamespace(name="w"), target, rounded, torch.zeros(4, dtype=torch.float16), report)
    assert report.overflowed == 2 and report.overflow_tensor == "w" and report.overflow_peak == 70000.0


@pytest.mark.parametrize(("scale", "changed"), [(1e-3, ["w"]), (0.0, [])])
def test_a_change_outside_the_sampled_rows_still_marks_the_tensor_changed(scale, changed, monkeypatch):
    """Rows 0, 10, 20, ... are sampled; the change sits in row 5 only. Oracle: torch.equal on the full fp32 tensor."""
    monkeypatch.setattr(engine, "SAMPLE_ELEMENTS", 64)
    monkeypatch.setattr(engine, "CPU_BLOCK_ELEMENTS", 16 * 8)
    stored = torch.ones(40, 16, dtype=torch.bfloat16)  # 640 elements: every 10th row sampled
    left = torch.zeros(40, 1)
    left[5] = scale
    right = torch.ones(1, 16)
    result = SimpleNamespace(rounding=RoundingReport(), changed_tensors=[])
    (output,) = engine._low_rank_blocked(SimpleNamespace(name="w"), stored, [(left, right)], [_one_step(1.0)], [result], torch.bfloat16, None)
    assert torch.equal(output, stored)  # 1 + 1e-3 rounds back to 1 in bfloat16
    full = torch.addmm(stored.float(), left, right)
    assert result.changed_tensors == changed == (["w"] if not torch.equal(full, stored.float()) else [])
    assert result.rounding.changed == 0  # no sampled row changed


def test_buffers_are_reused_for_tensors_of_similar_size_and_bounded():
    buffers = engine._Buffers(limit=3000)
    first = buffers.take(1000)
    buffers.give([first.view(torch.int16)])  # a view of the taken buffer, as outputs are
    again = buffers.take(900)
    assert again.data_ptr() == first.data_ptr() and again.numel() == 900
    small = buffers.take(300)
    assert small.data_ptr() != first.data_ptr()  # not for a tensor under half its size
    buffers.give([again, again, small, torch.empty(10, dtype=torch.uint8)])  # repeats and strangers are ignored
    assert buffers._held == 1300 and len(buffers._idle) == 2
    big = [buffers.take(1000) for _ in range(4)]  # the idle 1000 one, then new ones: the idle 300 one goes first
    assert big[0].data_ptr() == first.data_ptr() and not buffers._idle and buffers._held == 4000  # all lent: over the limit
    buffers.give(big)
    huge = buffers.take(5000)  # no idle buffer fits: every idle one goes before a new one is made
    assert not buffers._idle and buffers._held == 5000 and huge.numel() == 5000
    huge.fill_(7)
    assert int(huge.sum()) == 35000  # writable memory of its own


@pytest.fixture
def small_queues(monkeypatch):
    """Every queue at its minimum and every read in pieces: the paths a real model takes, on a tiny one."""
    monkeypatch.setattr(engine, "PREFETCH_BYTES", 1)
    monkeypatch.setattr(engine, "WRITE_BYTES", 1)
    monkeypatch.setattr(engine, "READ_AHEAD_BYTES", 4096)
    monkeypatch.setattr(engine, "ADVISE_BYTES", 1024)
    monkeypatch.setattr(engine, "CPU_BLOCK_ELEMENTS", 64 * 16)
    monkeypatch.setattr(checkpoint, "READ_CHUNK", 2048)
    monkeypatch.setattr(checkpoint, "WRITE_PIECE", 1000)


def test_sharded_bf16_merge_of_several_coeffs_matches_peft_and_the_full_tensor_path(tmp_path, small_queues, monkeypatch):
    base = build_base("llama", tmp_path / "base", shard_size="60KB", dtype=torch.bfloat16)
    assert len(list(base.glob("*.safetensors"))) > 1
    adapter = make_adapter(base, tmp_path / "adapter", DeloraConfig(r=4, delora_lambda=2, target_modules=TARGETS))
    low_rank_streamed = engine._low_rank_streamed
    coeffs = (0.5, -1.0, 0.0)
    outs = {c: tmp_path / f"c{c:g}" for c in coeffs}
    blocked = []
    monkeypatch.setattr(engine, "_low_rank_streamed", lambda tensor, *args: blocked.append(tensor.name) or low_rank_streamed(tensor, *args))
    results = weightsteer.merge_many(adapter, outs, base=base)
    assert len(blocked) == 7 * 2  # every projection of both layers went from file to files in row blocks
    assert_base_identical(base, outs[0.0])
    peft_model = PeftModel.from_pretrained(load_base(base), adapter)
    stored = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
    merged = {c: {k: v for f in outs[c].glob("*.safetensors") for k, v in load_file(f).items()} for c in coeffs}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        delta = module.get_delta_weight("default")  # PEFT's ΔW at λ as trained; the linear scheme scales λ by c
        for c in (0.5, -1.0):
            oracle = stored[key].float() + c * delta
            ours = merged[c][key].float()
            ulp = torch.finfo(torch.bfloat16).eps * oracle.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
            assert ((ours - oracle).abs() <= ulp).all(), (key, c)  # one rounding of (nearly) the same fp32 value
    assert {r.coeff for r in results if r.changed_tensors} == {0.5, -1.0}

    # The full-tensor path (no row blocks) writes the very same bytes.
    monkeypatch.setattr(engine, "_row_factors", lambda *args: None)
    reference = {c: tmp_path / f"full-c{c:g}" for c in (0.5, -1.0)}
    full = weightsteer.merge_many(adapter, reference, base=base)
    for c, result in zip((0.5, -1.0), full):
        assert_base_identical(outs[c], reference[c])
        ours = next(r for r in results if r.coeff == c)
        assert (ours.rounding.changed, ours.rounding.swallowed) == (result.rounding.changed, result.rounding.swallowed)
        assert ours.rounding.relative_error == pytest.approx(result.rounding.relative_error, rel=1e-5)
        assert ours.changed_tensors == result.changed_tensors
    shutil.rmtree(tmp_path / "base")


def test_copies_and_reads_interleave_in_file_order_with_minimal_queues(tmp_path, small_queues):
    """Unchanged tensors (copied in the kernel) and changed ones (read, computed) alternate in each shard."""
    base = build_base("llama", tmp_path / "base", shard_size="60KB")
    adapter = make_adapter(base, tmp_path / "adapter", DeloraConfig(r=4, delora_lambda=20, target_modules=["q_proj", "down_proj"]))
    assert_matches_runtime(base, adapter, tmp_path, [1.0, -0.5])


def test_unchanged_tensors_are_copied_through_memory_where_the_kernel_cannot(tmp_path, small_queues, monkeypatch):
    """Without copy_file_range (other filesystems, old kernels) the copy reads and writes in pieces, byte for byte."""
    def no_copy_file_range(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint.os, "copy_file_range", no_copy_file_range)
    monkeypatch.setattr(checkpoint, "READ_CHUNK", 1000)
    base = build_base("llama", tmp_path / "base", shard_size="60KB")
    adapter = make_adapter(base, tmp_path / "adapter", DeloraConfig(r=4, delora_lambda=20, target_modules=["q_proj"]))
    reads = []
    pread = checkpoint.os.pread
    monkeypatch.setattr(checkpoint.os, "pread", lambda fd, n, offset: reads.append(n) or pread(fd, n, offset))
    weightsteer.merge(adapter, tmp_path / "c0", coeff=0.0, base=base)  # coeff 0: every tensor is a copy
    assert_base_identical(base, tmp_path / "c0")
    stored = sum(i.nbytes for f in base.glob("*.safetensors") for i in read_header(f)[1])
    assert sum(reads) == stored and max(reads) <= 1000  # every byte, a read chunk at a time


def test_a_buffer_shared_by_outputs_is_recycled_only_after_its_last_write():
    buffers = engine._Buffers(1 << 20)
    shared = buffers.take(1000)
    writes = []

    class Writer:
        def write(self, name, tensor, staging):
            writes.append(tensor.data_ptr() in buffers._lent)  # still lent, so no read can reuse it meanwhile

    jobs = engine._writes([Writer(), Writer()], "w", [shared, shared], engine._PhaseClock(), [None, None], buffers)
    jobs[1]()
    assert shared.data_ptr() in buffers._lent and not buffers._idle
    jobs[0]()
    assert writes == [True, True] and not buffers._lent and buffers._idle


def test_outputs_written_in_parallel_lanes_equal_one_merge_each(tmp_path, small_queues, monkeypatch):
    """One lane slowed: the others run ahead, and every output is still byte for byte its own merge. Whole
    tensors go through the lanes (not low-rank here: the block-streamed path writes from the compute threads)."""
    base = build_base("llama", tmp_path / "base", shard_size="60KB", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", DeloraConfig(r=4, delora_lambda=20, target_modules=["q_proj", "down_proj"]))
    monkeypatch.setattr(engine, "_row_factors", lambda *args: None)
    write, slowed = checkpoint.ShardWriter.write, []

    def slow_for_one_output(self, *args):
        if self.path.parent.name.startswith(".c1."):  # the staging folder of output c1
            slowed.append(time.sleep(0.002))
        return write(self, *args)

    monkeypatch.setattr(checkpoint.ShardWriter, "write", slow_for_one_output)
    coeffs = (1.0, 0.0, -0.5)
    weightsteer.merge_many(adapter, {c: tmp_path / f"c{c:g}" for c in coeffs}, base=base)
    assert slowed
    for c in coeffs:
        weightsteer.merge(adapter, tmp_path / f"alone{c:g}", coeff=c, base=base)
        assert_base_identical(tmp_path / f"alone{c:g}", tmp_path / f"c{c:g}")


def test_cpu_buffers_are_released_when_the_stream_fails():
    with pytest.raises(ZeroDivisionError), engine._cpu_buffers(torch.device("cpu"), limit=1 << 20) as buffers:
        buffers.give([buffers.take(1000)])
        assert buffers._idle
        raise ZeroDivisionError  # the stream fails
    assert not buffers._idle and not buffers._lent


def test_a_base_cut_short_during_a_block_streamed_merge_fails_in_one_line_and_leaves_nothing(tmp_path, small_queues, monkeypatch):
    """The base file shrinks after planning (another process rewrites it): the block reads find its end, the
    merge fails with one line naming the file, and no output or staging folder is left."""
    base = build_base("llama", tmp_path / "base", shard_size="60KB", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", DeloraConfig(r=4, delora_lambda=2, target_modules=["down_proj"]))
    streamed_factors, cut = engine._streamed_factors, []

    def cut_before_the_last_layer(tensor, *args):
        if tensor.name.startswith("model.layers.1.") and not cut:
            data = tensor.source.file.read_bytes()
            cut.append(tensor.source.file.write_bytes(data[: tensor.source.start + tensor.source.nbytes // 2]))
        return streamed_factors(tensor, *args)

    monkeypatch.setattr(engine, "_streamed_factors", cut_before_the_last_layer)
    monkeypatch.setattr(engine, "COMPUTE_WORKERS", 3)
    with pytest.raises(weightsteer.BaseModelError, match="file ends inside tensor 'model.layers.1.mlp.down_proj.weight'; it is truncated"):
        weightsteer.merge_many(adapter, {0.5: tmp_path / "a", -1.0: tmp_path / "b"}, base=base)
    assert cut and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_an_interrupt_while_the_workers_compute_is_raised_only_once_they_stopped(monkeypatch):
    """Ctrl-C in the caller's wait: the workers stop at their next block and are done before the interrupt goes on
    (their files are closed after it; a late write could land on a reused descriptor)."""
    monkeypatch.setattr(engine, "CPU_BLOCK_ELEMENTS", 64 * 8)
    waits, real_wait = [], engine.wait

    def interrupted(futures):
        waits.append(futures)
        if len(waits) == 1:
            raise KeyboardInterrupt
        return real_wait(futures)

    monkeypatch.setattr(engine, "wait", interrupted)
    stored = torch.ones(4096, 64, dtype=torch.bfloat16)
    result = SimpleNamespace(rounding=RoundingReport(), changed_tensors=[])
    factors = [(torch.ones(4096, 1), torch.ones(1, 64))]
    with ThreadPoolExecutor(2) as pool, pytest.raises(KeyboardInterrupt):
        engine._low_rank_blocked(SimpleNamespace(name="w"), stored, factors, [_one_step(1.0)], [result], torch.bfloat16, pool)
    assert len(waits) == 2 and all(future.done() for future in waits[0])
