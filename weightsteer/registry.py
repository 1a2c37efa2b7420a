"""The registry of adapter families and formats, keyed on their type names.

Every entry is a `module:attribute` spec naming an `AdapterFamily` subclass. The built-in families are
listed in `weightsteer.adapters.BUILTIN` and third-party packages declare theirs as entry points in the
group `weightsteer.formats` (name = the type, value = the spec); both are loaded by the same `load_spec`,
so a plugin family is indistinguishable from a built-in one. A plugin may not replace a built-in type.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache
from importlib.metadata import entry_points
from typing import Mapping

from .errors import UnsupportedAdapterError

ENTRY_POINT_GROUP = "weightsteer.formats"


def load_spec(spec: str) -> object:
    """The object a `module:attribute` spec names (an instance if it names a class)."""
    module, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise UnsupportedAdapterError(f"Cannot load the weightsteer family {spec!r}: {e}") from e
    return found() if isinstance(found, type) else found


class Registry:
    """Type name → spec, from the built-in table and the installed entry points."""

    def __init__(self, builtin: Mapping[str, str], group: str = ENTRY_POINT_GROUP):
        self._builtin = dict(builtin)
        self._group = group

    @cache
    def specs(self) -> dict[str, str]:
        specs = dict(self._builtin)
        for entry in entry_points(group=self._group):
            name = entry.name.upper()
            if name in self._builtin:
                warnings.warn(f"Ignoring plugin entry point {entry.name}={entry.value}: {name} is a built-in type.", stacklevel=2)
                continue
            specs.setdefault(name, entry.value)
        return specs

    def __contains__(self, name: str) -> bool:
        return name in self.specs()

    def names(self) -> list[str]:
        return sorted(self.specs())

    def get(self, name: str) -> object:
        return _loaded(self.specs()[name])

    def unique(self) -> list[object]:
        """One object per distinct spec (several type names may share one family), in registration order."""
        return [_loaded(spec) for spec in dict.fromkeys(self.specs().values())]


@cache
def _loaded(spec: str) -> object:
    return load_spec(spec)
