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
