"""Coeffs given as KL budgets (kl:K, -kl:K): parsed here, light enough for the CLI's argument parsing; found by
`weightsteer.sweep`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SweepError


@dataclass(frozen=True)
class KLTarget:
    """A coeff given as a KL budget: the coeff of sign `sign` whose kl_p95 is `kl` nats."""

    kl: float
    sign: int = 1

    def __str__(self) -> str:
        return f"{'-' if self.sign < 0 else ''}kl:{self.kl:g}"


def parse_coeff(text: str | float) -> float | KLTarget:
    """A number (0.5, -1) or a KL budget: "kl:K" for the positive pole, "-kl:K" for the negative one."""
    try:
        return read_coeff(text)
    except ValueError as e:
        raise SweepError(str(e)) from None


def read_coeff(text: str | float) -> float | KLTarget:
    """`parse_coeff` raising ValueError, for argument parsers (a WeightsteerError would load huggingface_hub to
    redact its message, and the CLI's argument errors load nothing heavy)."""
    if not isinstance(text, str):
        return _finite(float(text), text)
    value = text.strip()
    sign = -1 if value.startswith("-") else 1
    body = value.lstrip("+-").strip()
    if body.lower().startswith("kl:"):
        try:
            kl = float(body[3:])
        except ValueError:
            kl = math.nan
        if not (math.isfinite(kl) and kl > 0):
            raise ValueError(f"{text!r}: the KL budget after kl: must be a positive number of nats, e.g. kl:1.0.")
        return KLTarget(kl, sign)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a coeff: give a number (0.5, -1) or a KL budget kl:K / -kl:K in nats.") from None
    return _finite(number, text)


def finite(c: float) -> float:
    """c as a float; SweepError when it is not finite."""
    return parse_coeff(float(c))


def _finite(c: float, text: object) -> float:
    if not math.isfinite(c):
        raise ValueError(f"coeff must be a finite number, got {text!r}.")
    return c
