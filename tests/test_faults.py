"""Fault injection: a merge killed (SIGKILL) early, mid-stream, before publishing and inside the overwrite swap;
a full disk and a read-only folder; two merges racing for one output. After each: what is visible under the
output name is a complete checkpoint or nothing, and the next run cleans up and says so.

Kill points are `weightsteer.outputs.fault_point` calls, armed by $WEIGHTSTEER_TEST_FAULT in a forked child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig

import weightsteer
from conftest import make_adapter, model_logits
from weightsteer.cli import main
from weightsteer import outputs
from weightsteer.outputs import FAULT_ENV

@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory):
    return make_adapter(bases("llama:sharded"), tmp_path_factory.mktemp("faults") / "adapter", LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))


class Child:
    """`weightsteer.merge` in a forked child (torch already imported) that hits the fault point `fault`."""

    def __init__(self, adapter: Path, output: Path, coeff: float, fault: str, overwrite: bool = False, renameat2: bool = True):
        self.pid = os.fork()
        if self.pid == 0:
            torch.set_num_threads(1)  # the parent's OpenMP thread pool does not survive a fork
            os.environ[FAULT_ENV] = fault
            if not renameat2:  # a filesystem without it: the fallbacks run
                outputs._renameat2 = lambda *args: False
            try:
                weightsteer.merge(adapter, output, coeff=coeff, overwrite=overwrite)
            except BaseException:
                os._exit(1)
            os._exit(0)

    def wait(self, options: int = 0) -> int:
        """The raw wait status (os.WIFSIGNALED / WIFSTOPPED / WEXITSTATUS read it)."""
        return os.waitpid(self.pid, options)[1]


def child_merge(adapter: Path, output: Path, coeff: float, fault: str, overwrite: bool = False, renameat2: bool = True) -> Child:
    return Child(adapter, output, coeff, fault, overwrite, renameat2)


def killed(child: Child) -> int:
    status = child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return child.pid


def siblings(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def recorded_coeff(output: Path) -> float:
    return json.loads((output / "weightsteer.json").read_text())["coeff"]


@pytest.mark.parametrize("point", ["locked", "streaming", "publish"])
def test_a_killed_merge_leaves_no_output_and_the_next_run_cleans_up(adapter, tmp_path, point):
    out = tmp_path / "out"
    pid = killed(child_merge(adapter, out, 0.5, point))
    assert not out.exists()  # never a half-written checkpoint under the output name
    left = siblings(tmp_path, "out")
    assert ".out.weightsteer.lock" in left  # a dead holder's lock file: flock died with it
    assert any(n.startswith(f".out.weightsteer-{pid}-") for n in left) == (point != "locked")
    result = weightsteer.merge_many(adapter, {0.5: out})[0]
    assert (point != "locked") == any(f"(pid {pid}), freeing" in w for w in result.warnings), result.warnings
    assert siblings(tmp_path, "out") == [] and recorded_coeff(out) == 0.5


@pytest.mark.parametrize("point", ["publish", "swapped"])
def test_a_merge_killed_while_overwriting_keeps_one_complete_checkpoint_visible(adapter, tmp_path, point):
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=-1)
    old_logits = model_logits(out)
    killed(child_merge(adapter, out, 2.0, point, overwrite=True))
    expected = -1 if point == "publish" else 2.0  # before the swap the old one, after it the new one, never none
    assert recorded_coeff(out) == expected
    if expected == -1:
        assert (model_logits(out) - old_logits).abs().max() == 0
    result = weightsteer.merge_many(adapter, {1.0: out}, overwrite=True)[0]
    assert any("freeing" in w for w in result.warnings) and siblings(tmp_path, "out") == []
    assert recorded_coeff(out) == 1.0


def test_concurrent_merges_to_one_output_the_second_fails_naming_the_first(adapter, tmp_path):
    out = tmp_path / "out"
    first = child_merge(adapter, out, 0.5, "publish:STOP")  # stops with the lock held, its checkpoint staged
    try:
        assert os.WIFSTOPPED(first.wait(os.WUNTRACED))
        result = CliRunner().invoke(main, ["merge", str(adapter), "-c", "2", "-o", str(out)])
        assert result.exit_code == 1
        assert f"Another weightsteer process (pid {first.pid}) is writing {out}" in result.stderr
        result = CliRunner().invoke(main, ["merge", str(adapter), "-c", "2", "-o", str(out), "--overwrite"])
        assert result.exit_code == 1 and f"pid {first.pid}" in result.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    status = first.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert recorded_coeff(out) == 0.5 and siblings(tmp_path, "out") == []


@contextmanager
def small_filesystem(folder: Path, size: str, read_only: bool = False):
    """A tmpfs mounted at folder (root only; the test is skipped with the reason otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_refused_before_writing_naming_both_sizes(adapter, tmp_path):
    with small_filesystem(tmp_path / "small", "64k") as small:
        result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(small / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "Not enough free space" in result.stderr and "the output needs" in result.stderr and "are free" in result.stderr
        assert list(small.iterdir()) == []


def test_a_disk_that_fills_while_writing_gives_one_line_and_leaves_nothing(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["weightsteer.merge"], "check_free_space", lambda sizes: None)  # the estimate was wrong
    with small_filesystem(tmp_path / "small", "64k") as small:
        result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(small / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "the disk is full" in result.stderr
        assert list(small.iterdir()) == []


def test_a_read_only_parent_gives_one_line(adapter, tmp_path):
    with small_filesystem(tmp_path / "ro", "64k", read_only=True) as read_only:
        result = CliRunner().invoke(main, ["merge", str(adapter), "-o", str(read_only / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "the filesystem is read-only" in result.stderr


def test_swap_fallback_without_renameat2_puts_back_an_old_output_left_aside(adapter, tmp_path):
    """Without RENAME_EXCHANGE the old output is renamed aside first; a run killed right there leaves no output,
    and the next run on it puts the old one back before anything else."""
    out = weightsteer.merge(adapter, tmp_path / "out", coeff=-1)
    pid = killed(child_merge(adapter, out, 2.0, "swapped-aside", overwrite=True, renameat2=False))
    assert not out.exists() and any(n.endswith("-old") and f"-{pid}-" in n for n in siblings(tmp_path, "out"))
    with pytest.raises(weightsteer.OutputError, match="exists already"):
        weightsteer.merge(adapter, out)  # the old output is back, so a run without overwrite is refused
    assert recorded_coeff(out) == -1 and siblings(tmp_path, "out") == []


def test_publish_fallback_without_renameat2_still_never_replaces(adapter, tmp_path):
    status = child_merge(adapter, tmp_path / "out", 0.5, "", renameat2=False).wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and recorded_coeff(tmp_path / "out") == 0.5
