"""weightsteer: bake steering adapters into a model's own weights, at any signed strength."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AdapterError,
    BaseModelError,
    OutputError,
    PushError,
    SchemeError,
    SweepError,
    UnsupportedAdapterError,
    VerificationError,
    WeightsteerError,
)
from .hub import push  # noqa: E402
from .merge import MergeResult, RoundingReport, merge, merge_many  # noqa: E402
from .runtime import scaled  # noqa: E402
from .sweep import SweepPoint, SweepReport, sweep  # noqa: E402
from .verify import LogitsCheck, TensorCheck, VerifyReport, verify  # noqa: E402

__all__ = [
    "__version__",
    "merge",
    "merge_many",
    "scaled",
    "sweep",
    "verify",
    "push",
    "MergeResult",
    "RoundingReport",
    "SweepReport",
    "SweepPoint",
    "VerifyReport",
    "TensorCheck",
    "LogitsCheck",
    "WeightsteerError",
    "AdapterError",
    "UnsupportedAdapterError",
    "BaseModelError",
    "SchemeError",
    "OutputError",
    "VerificationError",
    "PushError",
    "SweepError",
]
