"""weightsteer: bake steering adapters into a model's own weights, at any signed strength."""

__version__ = "0.1.0"

from .errors import AdapterError, BaseModelError, OutputError, SchemeError, UnsupportedAdapterError, WeightsteerError  # noqa: E402
from .merge import MergeResult, RoundingReport, merge, merge_many  # noqa: E402
from .runtime import scaled  # noqa: E402

__all__ = [
    "__version__",
    "merge",
    "merge_many",
    "scaled",
    "MergeResult",
    "RoundingReport",
    "WeightsteerError",
    "AdapterError",
    "UnsupportedAdapterError",
    "BaseModelError",
    "SchemeError",
    "OutputError",
]
