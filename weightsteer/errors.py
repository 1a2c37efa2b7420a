"""Errors weightsteer raises. Every message says what was wrong, where, and what to do."""

from __future__ import annotations

import os
import re

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
# An Authorization header in any spelling a library prints (HTTP, JSON, a repr of a dict), and Hub tokens.
_AUTHORIZATION = re.compile(r"""(?i)(["']?(?:proxy-)?authorization["']?\s*[:=]\s*["']?)[^"'\r\n,}]*""")
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
REDACTED = "***"


def redact(text: str) -> str:
    """Remove the Hugging Face token and any Authorization header value from a message, whoever wrote it."""
    for token in _known_tokens():
        text = text.replace(token, REDACTED)
    text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
    return _HUB_TOKEN.sub("hf_" + REDACTED, text)


def _known_tokens() -> set[str]:
    tokens = {os.environ.get(name) for name in TOKEN_ENV}
    try:
        from huggingface_hub import get_token  # the stored `hf auth login` token too

        tokens.add(get_token())
    except Exception:  # no huggingface_hub, or an unreadable token file: the env vars are all we know
        pass
    return {t for t in tokens if t and len(t) >= 4}


class WeightsteerError(Exception):
    """Base class: a problem with the user's input that weightsteer detected before writing output.

    Messages are redacted on construction: they often quote what a library raised, which may hold the token."""

    def __init__(self, *args: object):
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class AdapterError(WeightsteerError):
    """The adapter folder, its config or its tensors are missing, malformed or inconsistent."""


class UnsupportedAdapterError(AdapterError):
    """The adapter type cannot be expressed as a weight change (or is not supported yet)."""


class BaseModelError(WeightsteerError):
    """The base checkpoint is missing, in an unsupported format, or does not match the adapter."""


class SchemeError(WeightsteerError):
    """The coeff or coeff scheme is invalid for this adapter type."""


class OutputError(WeightsteerError):
    """The output location cannot be written (exists already, not writable, ...)."""


class VerificationError(WeightsteerError):
    """A merged checkpoint does not compute what its adapter computes at its coeff, or cannot be checked."""


class PushError(WeightsteerError):
    """Publishing to the Hugging Face Hub is impossible (repo id, token) or failed (network, server)."""


class ExportError(WeightsteerError):
    """An adapter's change cannot be written in the requested form (e.g. a change a LoRA cannot express)."""


class DeviceError(WeightsteerError):
    """The compute device is unknown to torch or not available on this machine."""


class ConverterError(WeightsteerError):
    """An external converter (llama.cpp's convert_hf_to_gguf.py, convert_lora_to_gguf.py) is missing or failed."""


class SweepError(WeightsteerError):
    """A sweep's inputs (coeffs, prompts, pairs, KL budget, output folder) are invalid, or a plot cannot be drawn."""


class RecipeError(WeightsteerError):
    """A recipe file is malformed: an unknown key, a missing path, a coeff that is not a number, ..."""
