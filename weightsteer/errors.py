"""Errors weightsteer raises. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class WeightsteerError(Exception):
    """Base class: a problem with the user's input that weightsteer detected before writing output."""


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


class ConverterError(WeightsteerError):
    """An external converter (llama.cpp's convert_hf_to_gguf.py, convert_lora_to_gguf.py) is missing or failed."""


class SweepError(WeightsteerError):
    """A sweep's inputs (coeffs, prompts, pairs, KL budget, output folder) are invalid, or a plot cannot be drawn."""
