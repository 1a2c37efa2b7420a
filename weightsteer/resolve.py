"""Resolving what the user names: a local folder as is, or a Hub repo id through the Hub cache
(offline once cached)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import WEIGHT_FORMATS_REFUSED
from .errors import AdapterError, BaseModelError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.md"]
BASE_IGNORED = [f"*{suffix}" for suffix in WEIGHT_FORMATS_REFUSED] + ["original/*", "*.onnx", "*.tflite", "*.ot"]
# A missing path with one of these endings is a mistyped file, not a Hub repo id (ids may contain dots too).
FILE_SUFFIXES = (".gguf", ".safetensors", ".pt", ".pth", ".bin", ".json", ".yaml", ".yml")


def resolve(ref: str | Path, kind: str, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id downloaded into (or read from) the Hub cache.

    kind is "adapter" or "base" and decides which files are fetched and which error is raised.
    """
    error = AdapterError if kind == "adapter" else BaseModelError
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise error(f"{kind} {path} is a file; pass the folder that holds it.")
        return path
    if path.suffix.lower() in FILE_SUFFIXES:
        raise error(f"{kind} {ref!r}: no such file or folder ({Path(os.path.abspath(path)).parent} has none of that name).")
    # Imported here: huggingface_hub's Hub client takes ~0.4 s to import, which a merge of local folders skips.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(ref))
    except HFValidationError:
        raise error(f"{kind} {ref!r} is neither an existing folder nor a valid Hub repo id.") from None
    patterns = {"allow_patterns": ADAPTER_FILES} if kind == "adapter" else {"ignore_patterns": BASE_IGNORED}
    try:
        return Path(snapshot_download(str(ref), revision=revision, **patterns))
    except Exception as e:  # huggingface_hub raises many types: offline, 401, 404, network
        raise error(  # redacted on construction: the server's reply may echo the request's Authorization header
            f"Could not get {kind} {ref!r} from the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())}). "
            "Check the repo id and your token, or pass a local folder. Offline, only repos already in the cache work."
        ) from None


def hub_reference(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a Hub-cache snapshot folder (…/models--org--name/snapshots/<commit>); None otherwise."""
    real = Path(os.path.realpath(path))
    repo_folder = real.parent.parent.name
    kind, _, name = repo_folder.partition("--")
    if real.parent.name != "snapshots" or kind not in ("models", "datasets", "spaces") or "--" not in name:
        return None
    return name.replace("--", "/", 1), real.name


def published_reference(ref: str, path: Path) -> tuple[str, str | None, str | None, str | None]:
    """How an input is recorded without the merging machine's local paths: (shown name, Hub id, Hub commit,
    absolute local path). A Hub-cache folder becomes its repo id at that commit; a local folder shows only its
    name, and its absolute path is kept apart (for `verify` on this machine, never pushed)."""
    hub = hub_reference(path)
    if hub is not None:
        return hub[0], hub[0], hub[1], None
    return Path(os.path.abspath(path)).name, None, None, os.path.abspath(path)
