"""Assembling an output folder: staging, support files copied byte for byte, minimal config patches,
the shard index, and the atomic rename that makes it visible."""

from __future__ import annotations

import json
import shutil
import tempfile
from json.decoder import scanstring
from pathlib import Path

from .checkpoint import INDEX_NAME, WEIGHT_FORMATS_REFUSED, Checkpoint
from .errors import OutputError

CARD_NAME = "README.md"
PROVENANCE_NAME = "weightsteer.json"
SKIPPED_DIRS = {".git", ".cache", ".huggingface"}


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputError(f"Output {output} exists already; pass --overwrite (overwrite=True) to replace it.")
    if output.exists() and not output.is_dir():
        raise OutputError(f"Output {output} exists and is not a folder; remove it or choose another path.")
    if not output.parent.exists():
        raise OutputError(f"The parent folder of {output} does not exist.")


def staging_dir(output: Path) -> Path:
    """A hidden sibling of output: same filesystem, so the final rename is atomic."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.weightsteer-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is normally readable by all
    return staging


def publish(staging: Path, output: Path) -> None:
    """Move the finished folder into place; an older output (only with overwrite) goes last."""
    old = None
    if output.exists():
        old = staging.with_name(staging.name + "-old")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


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
    skip = checkpoint.weight_files() | {CARD_NAME}
    copied, dropped = [], []
    for source in sorted(checkpoint.root.rglob("*")):
        relative = source.relative_to(checkpoint.root)
        if source.is_dir() or relative.parts[0] in SKIPPED_DIRS or str(relative) in skip:
            continue
        if _holds_weights(relative):
            dropped.append(str(relative))
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(relative) == "config.json" and config_patch:
            target.write_text(patch_json_text(source.read_text(), config_patch))
        else:
            shutil.copyfile(source, target)  # follows the Hub cache's symlinks
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
        shutil.copyfile(source / name, staging / name)
    return copied


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


def remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

