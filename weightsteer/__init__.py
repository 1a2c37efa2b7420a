"""weightsteer: bake steering adapters into a model's own weights, at any signed strength."""

__version__ = "0.1.0"

import sys  # noqa: E402
from importlib import import_module  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from .errors import (  # noqa: E402
    AdapterError,
    BaseModelError,
    OutputError,
    PushError,
    RecipeError,
    SchemeError,
    SweepError,
    UnsupportedAdapterError,
    VerificationError,
    WeightsteerError,
)

# Public names whose modules import torch (and more) are loaded on first use, so that `import weightsteer`
# and the CLI's --help stay fast.
_LAZY = {
    "push": "hub",
    "merge": "merge",
    "merge_many": "merge",
    "MergeResult": "merge",
    "RoundingReport": "merge",
    "Steer": "merge",
    "build": "recipe",
    "scaled": "runtime",
    "sweep": "sweep",
    "SweepReport": "sweep",
    "SweepPoint": "sweep",
    "verify": "verify",
    "VerifyReport": "verify",
    "TensorCheck": "verify",
    "LogitsCheck": "verify",
}

if TYPE_CHECKING:
    from .hub import push
    from .merge import MergeResult, RoundingReport, Steer, merge, merge_many
    from .recipe import build
    from .runtime import scaled
    from .sweep import SweepPoint, SweepReport, sweep
    from .verify import LogitsCheck, TensorCheck, VerifyReport, verify


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule, e.g. weightsteer.export, as after an eager import
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'weightsteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(ModuleType):
    """Importing the submodule weightsteer.merge (or .verify) sets it as the package attribute `merge`;
    the public name stays the function, as with an eager `from .merge import merge`."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "__version__",
    "merge",
    "merge_many",
    "build",
    "Steer",
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
    "RecipeError",
    "SweepError",
]
