"""Assembling an output folder: staging, support files copied byte for byte, minimal config patches,
the shard index, and publishing it without ever destroying what weightsteer did not write.

The guarantees (README "Safety"):
- an existing output is replaced only with overwrite=True, and only if weightsteer wrote it (its marker
  file, e.g. weightsteer.json, is there) or it is empty; an output that is, contains or lies inside the
  base or the adapter is refused always;
- an exclusive lock file beside the output (`.NAME.weightsteer.lock`, holding the pid) is held from the
  check to the publish, and publishing never replaces what was not checked: a no-replace rename
  (renameat2 RENAME_NOREPLACE; elsewhere mkdir as an atomic probe, then a rename over the empty folder);
- overwriting swaps old and new atomically (renameat2 RENAME_EXCHANGE), so at every instant one complete
  checkpoint is visible under the output name. Where the filesystem lacks it, the old output is renamed
  aside first; a run killed between the two renames leaves it as `.NAME.weightsteer-PID-XXXX-old`, and
  the next run on that output puts it back;
- staging folders carry the owning pid in their name (`.NAME.weightsteer-PID-XXXX`); a later run on the
  same output removes those of dead processes and says how much it freed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from json.decoder import scanstring
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from .checkpoint import INDEX_NAME, WEIGHT_FORMATS_REFUSED, Checkpoint, contained_file
from .errors import OutputError

CARD_NAME = "README.md"
PROVENANCE_NAME = "weightsteer.json"
LOCAL_PATHS_NAME = ".weightsteer-local.json"  # absolute local input paths, for verify on this machine; never pushed
SKIPPED_DIRS = {".git", ".cache", ".huggingface"}
STAGING_INFIX = ".weightsteer-"
FAULT_ENV = "WEIGHTSTEER_TEST_FAULT"  # tests/test_faults.py: "POINT" (SIGKILL there) or "POINT:STOP" (SIGSTOP)
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def fault_point(name: str) -> None:
    """Fault injection for the tests: die here as `kill -9` would (or stop) when $WEIGHTSTEER_TEST_FAULT names this point."""
    point, _, signal_name = os.environ.get(FAULT_ENV, "").partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{signal_name or 'KILL'}"))


class OutputSlot:
    """One output folder from check to publish: the lock, the checks, the staging folder and the swap.

        with OutputSlot(path, overwrite) as slot:      # locks, checks, removes dead runs' leftovers
            slot.protect(base=..., adapter=...)        # refuse outputs that overlap the inputs
            staging = slot.stage()                     # write everything here
            slot.publish()                             # no-replace rename, or the atomic swap
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool, marker: str = PROVENANCE_NAME):
        self.output = Path(os.path.abspath(output))
        self.overwrite, self.marker = overwrite, marker
        self.staging: Path | None = None
        self.notes: list[str] = []  # what the user should hear (leftovers removed or restored)
        self._lock: _Lock | None = None

    def __enter__(self) -> "OutputSlot":
        cwd = Path(os.getcwd())
        if not self.output.name or self.output == cwd or self.output in cwd.parents:
            raise OutputError(f"Output {self.output} is (or contains) the current folder; name a new folder, e.g. ./merged.")
        with disk_errors(self.output.parent):
            if not self.output.parent.is_dir():
                raise OutputError(f"The parent folder of {self.output} does not exist; create it first.")
            self._lock = _Lock(self.output)
            try:
                self.notes += _remove_leftovers(self.output)
                check_existing(self.output, self.overwrite, self.marker)
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()

    def protect(self, *inputs: tuple[str, Path], **named: Path) -> None:
        """Refuse an output that is, contains or lies inside one of the inputs ((kind, path) pairs, or kind=path)."""
        refuse_overlap(self.output, [*inputs, *named.items()])

    def stage(self) -> Path:
        """A hidden sibling of the output (same filesystem, so publishing is a rename), named with our pid."""
        with disk_errors(self.output.parent):
            prefix = f".{self.output.name}{STAGING_INFIX}{os.getpid()}-"
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.output.parent))
            self.staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is normally readable by all
        return self.staging

    def publish(self) -> None:
        """Make the staging folder the output: never replacing what was not checked, never leaving none."""
        fault_point("publish")
        with disk_errors(self.output.parent):
            if self.overwrite and os.path.lexists(self.output):
                check_existing(self.output, True, self.marker)  # still ours to replace
                _swap(self.staging, self.output)
                fault_point("swapped")
                shutil.rmtree(self.staging)  # it now holds the old output
            else:
                _rename_noreplace(self.staging, self.output)
        self.staging = None


def check_existing(output: Path, overwrite: bool, marker: str = PROVENANCE_NAME) -> None:
    """An existing output may be replaced only with overwrite=True, and only if weightsteer wrote it or it is empty."""
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise OutputError(f"Output {output} exists already; pass overwrite=True to replace it, or choose another path.")
    if output.is_symlink() or not output.is_dir():
        raise OutputError(
            f"Output {output} exists and is not a folder; overwrite=True replaces only a folder weightsteer wrote. "
            "Remove it yourself or choose another path."
        )
    if (output / marker).is_file():
        return
    files = _files_in(output)
    if files or any(output.iterdir()):
        held = f"{len(files)} file{'s' if len(files) != 1 else ''} such as {files[0]}" if files else "only empty folders"
        raise OutputError(
            f"Output {output} is not a weightsteer output ({held}, no {marker}); overwrite=True replaces only a "
            "folder weightsteer wrote, or an empty one. Remove it yourself or choose another path."
        )


def _files_in(folder: Path) -> list[str]:
    """Relative paths of the files under folder (links not followed), top-level ones first."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += sorted(os.path.relpath(os.path.join(root, n), folder) for n in names)
    return found


def refuse_overlap(output: Path, sources: Mapping[str, Path | None] | Iterable[tuple[str, Path | None]]) -> None:
    """Refuse an output that is, contains or lies inside an input (kind → path, or (kind, path) pairs; compared
    as resolved real paths)."""
    real = Path(os.path.realpath(output))
    for kind, source in sources.items() if isinstance(sources, Mapping) else sources:
        if source is None:
            continue
        src = Path(os.path.realpath(source))
        if real == src or real in src.parents:
            raise OutputError(
                f"Output {output} is or contains the {kind} {source}; writing there would destroy it. "
                "Choose another output."
            )
        if src in real.parents:
            raise OutputError(
                f"Output {output} lies inside the {kind} folder {source}; outputs there become part of that "
                "model (later merges would copy them). Choose an output outside it."
            )


def check_file_output(target: Path, overwrite: bool, sources: Mapping[str, Path], magic: bytes, kind: str) -> None:
    """The same rules for a single-file output (a GGUF file): replace only a file of that kind, never an input."""
    refuse_overlap(target, sources)
    if not os.path.lexists(target):
        if not target.parent.is_dir():
            raise OutputError(f"The folder of {target} does not exist; create it first.")
        return
    if not overwrite:
        raise OutputError(f"{target} exists already; pass overwrite=True to replace it, or choose another path.")
    if target.is_symlink() or not target.is_file() or _first_bytes(target, len(magic)) != magic:
        raise OutputError(
            f"{target} exists and is not a {kind} file; overwrite=True replaces only a {kind} file. "
            "Remove it yourself or choose another path."
        )


def _first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def check_free_space(sizes: Sequence[tuple[Path, int]]) -> None:
    """Refuse before writing when the outputs (path, bytes) will not fit on their filesystems."""
    needed: dict[int, tuple[Path, int]] = {}
    for output, size in sizes:
        device = os.stat(output.parent).st_dev
        folder, total = needed.get(device, (output.parent, 0))
        needed[device] = (folder, total + size)
    for folder, total in needed.values():
        free = shutil.disk_usage(folder).free
        if total > free:
            raise OutputError(
                f"Not enough free space in {folder}: the output needs {human_bytes(total)} ({total} bytes), "
                f"{human_bytes(free)} ({free} bytes) are free. Free some space or write to another disk."
            )


@contextmanager
def disk_errors(where: Path) -> Iterator[None]:
    """OSErrors of a full disk, a read-only or forbidden folder as OutputError (one line, no traceback)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        name = str(e.filename or where)
        if not name.startswith(str(where)):  # an input that cannot be read
            raise OutputError(f"Cannot read {name}: {DISK_ERRORS[e.errno]} ({e.strerror}).") from None
        raise OutputError(f"Cannot write in {where}: {DISK_ERRORS[e.errno]} ({e.strerror}: {name}).") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Lock:
    """An exclusive flock on `.NAME.weightsteer.lock` beside the output, holding our pid."""

    def __init__(self, output: Path):
        self.path = output.with_name(f".{output.name}.weightsteer.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"Another weightsteer process (pid {holder}) is writing {output} right now; wait for it to "
                    "finish, or choose another output."
                ) from None
            if self._current(fd):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def _current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened this inode sees it is stale
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _remove_leftovers(output: Path) -> list[str]:
    """Remove staging folders of dead weightsteer processes for this output; put back an old output a killed
    swap left aside. Returns what was done, for the user."""
    prefix = f".{output.name}{STAGING_INFIX}"
    notes, freed, removed, owners = [], 0, 0, set()
    for path in sorted(output.parent.iterdir()):
        pid = _owner(path.name, prefix)
        if pid is None or _alive(pid) or not path.is_dir() or path.is_symlink():
            continue
        if path.name.endswith("-old") and not os.path.lexists(output):
            path.rename(output)
            notes.append(f"restored {output.name} from {path.name}, left aside by a killed weightsteer run (pid {pid})")
            continue
        freed += sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)
        shutil.rmtree(path, ignore_errors=True)
        removed, owners = removed + 1, owners | {pid}
    if removed:
        pids = ", ".join(str(p) for p in sorted(owners))
        notes.append(
            f"removed {removed} unfinished output folder{'s' if removed > 1 else ''} of {output.name} left by killed "
            f"weightsteer runs (pid {pids}), freeing {human_bytes(freed)}"
        )
    return notes


def _owner(name: str, prefix: str) -> int | None:
    """The pid in a staging folder's name `.NAME.weightsteer-PID-XXXX[-old]`, or None if it is not one."""
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2) with flags; False where the C library or the filesystem does not support it."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename_noreplace(staging: Path, output: Path) -> None:
    try:
        if not _renameat2(staging, output, _RENAME_NOREPLACE):
            os.mkdir(output)  # atomic probe: fails if anything is there; the rename may replace only an empty folder
            os.rename(staging, output)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise OutputError(
            f"Output {output} appeared while this run was writing it (created by another program); nothing was "
            "replaced and this run's result was discarded. Remove it, or pass overwrite=True."
        ) from None


def _swap(staging: Path, output: Path) -> None:
    """Exchange staging and output atomically; afterwards staging holds the old output."""
    if _renameat2(staging, output, _RENAME_EXCHANGE):
        return
    aside = staging.with_name(staging.name + "-old")
    os.rename(output, aside)
    fault_point("swapped-aside")
    os.rename(staging, output)
    os.rename(aside, staging)


# Files and folders that hold weights in another format or another copy; the merge rewrites only the
# safetensors it read, so any of these would shadow or contradict it (vLLM prefers Mistral's consolidated file,
# transformers loads a stray adapter_config.json as an adapter, runtimes pick up ONNX / OpenVINO / CoreML copies).
STALE_WEIGHT_SUFFIXES = (
    *WEIGHT_FORMATS_REFUSED, ".safetensors", ".onnx", ".onnx_data", ".tflite", ".ot", ".mlmodel", ".npz", ".index.json",
)
STALE_WEIGHT_NAMES = ("adapter_config.json", "openvino_model.xml")
STALE_WEIGHT_DIRS = ("onnx", "original", "openvino", "coreml", "tflite")
STALE_WEIGHT_DIR_SUFFIXES = (".mlpackage", ".mlmodelc")


def copy_support_files(checkpoint: Checkpoint, staging: Path, config_patch: dict[str, object]) -> tuple[list[str], list[str]]:
    """Copy every non-weight file of the base (tokenizer, generation config, license, ...) unchanged.

    Returns (copied, dropped): dropped are the base's files that hold weights the merge did not rewrite."""
    copied = []
    files, dropped = support_files(checkpoint)
    for relative, real in files:
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(relative) == "config.json" and config_patch:
            target.write_text(patch_json_text(real.read_text(), config_patch))
        else:
            shutil.copyfile(real, target)  # follows the Hub cache's symlinks
        copied.append(str(relative))
    return copied, dropped


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def copy_tokenizer_files(source: Path, staging: Path) -> list[str]:
    """Copy the tokenizer files of `source` (an adapter that added tokens ships its tokenizer) over the base's."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(contained_file(source, source / name), staging / name)  # no link out of the adapter's folder
    return copied


def support_files(checkpoint: Checkpoint) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(relative path, real path) of every base file an output copies, and the files it drops (see
    `_holds_weights`); a link that leaves the model, loops or dangles is refused here, so merges call this before
    streaming."""
    skip = checkpoint.weight_files() | {CARD_NAME}
    found, dropped = [], []
    for source in sorted(checkpoint.root.rglob("*")):
        relative = source.relative_to(checkpoint.root)
        if relative.parts[0] in SKIPPED_DIRS or str(relative) in skip:
            continue
        if _holds_weights(relative):
            if not source.is_dir():
                dropped.append(str(relative))
            continue
        real = contained_file(checkpoint.root, source)
        if not real.is_dir():
            found.append((relative, real))
    return found, dropped


def _holds_weights(relative: Path) -> bool:
    folders = relative.parts[:-1]
    return (
        relative.name.endswith(STALE_WEIGHT_SUFFIXES)
        or relative.name in STALE_WEIGHT_NAMES
        or any(f.lower() in STALE_WEIGHT_DIRS or f.endswith(STALE_WEIGHT_DIR_SUFFIXES) for f in folders)
    )


def patch_json_text(text: str, patch: dict[str, object]) -> str:
    """Set keys in a JSON document, leaving every other byte as it was. A dotted key ("text_config.vocab_size")
    sets a key of a nested object that exists (the key is skipped where the object does not)."""
    spans, closing = _top_level_spans(text)
    nested: dict[str, dict[str, object]] = {}
    edits = []
    missing = {}
    for key, value in patch.items():
        outer, dot, inner = key.partition(".")
        if dot and outer in spans and key not in spans:
            nested.setdefault(outer, {})[inner] = value
        elif key in spans:
            edits.append((*spans[key], json.dumps(value)))
        else:
            missing[key] = value
    for outer, inner_patch in nested.items():
        start, end = spans[outer]
        if text[start] == "{":
            edits.append((start, end, patch_json_text(text[start:end], inner_patch)))
    if missing:
        indent = _indent(text)
        added = "".join(f",\n{indent}{json.dumps(k)}: {json.dumps(v)}" for k, v in missing.items())
        end = text.rstrip()[:closing].rstrip()
        edits.append((len(end), closing, added + "\n" + _closing_indent(text, closing)))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _closing_indent(text: str, closing: int) -> str:
    """The whitespace before the closing brace on its own line (none at the top level)."""
    line_start = text.rfind("\n", 0, closing) + 1
    before = text[line_start:closing]
    return before if not before.strip() else ""


def _top_level_spans(text: str) -> tuple[dict[str, tuple[int, int]], int]:
    decoder = json.JSONDecoder()
    spans = {}
    i = text.index("{") + 1
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "}":
            return spans, i
        key, i = scanstring(text, i + 1)
        i = text.index(":", i) + 1
        while text[i] in " \t\r\n":
            i += 1
        _, end = decoder.raw_decode(text, i)
        spans[key] = (i, end)
        i = end


def _indent(text: str) -> str:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip()
        if stripped.startswith('"'):
            return line[: len(line) - len(stripped)]
    return "  "


def write_index(staging: Path, weight_map: dict[str, str], total_size: int, base_metadata: dict) -> None:
    metadata = {**base_metadata, "total_size": total_size}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
