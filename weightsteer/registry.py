"""The registries of adapter families and file formats, keyed on their names.

Every entry is a `module:attribute` spec naming an `AdapterFamily` subclass (a PEFT type, keyed on its
peft_type) or a `Format` subclass (a non-PEFT artefact detected from its files, keyed on its format name).
The built-ins are listed in `weightsteer.adapters.BUILTIN` and `weightsteer.formats.BUILTIN_FORMATS`;
third-party packages declare theirs as entry points in the one group `weightsteer.formats` (name = the
type or format, value = the spec). Both are loaded by the same `load_spec`, so a plugin is
indistinguishable from a built-in. Each registry keeps the entry points whose object is of its kind
(a family or a format); a plugin may not replace a built-in name.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache
from importlib.metadata import entry_points
from typing import Callable, Mapping

from .errors import UnsupportedAdapterError

ENTRY_POINT_GROUP = "weightsteer.formats"


def load_spec(spec: str) -> object:
    """The object a `module:attribute` spec names (an instance if it names a class)."""
    module, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise UnsupportedAdapterError(f"Cannot load the weightsteer family or format {spec!r}: {e}") from e
    return found() if isinstance(found, type) else found


class Registry:
    """Name → spec, from the built-in table and the installed entry points whose object is a `kind`.

    `normalize` maps an entry point's name to a key (families: upper case, as PEFT writes peft_type).
    """

    def __init__(
        self, builtin: Mapping[str, str], kind: type, group: str = ENTRY_POINT_GROUP, normalize: Callable[[str], str] = str.upper
    ):
        self._builtin = dict(builtin)
        self._kind = kind
        self._group = group
        self._normalize = normalize

    @cache
    def specs(self) -> dict[str, str]:
        specs = dict(self._builtin)
        for entry in entry_points(group=self._group):
            name = self._normalize(entry.name)
            if not self._accepts(entry.value):
                continue
            if name in self._builtin:
                warnings.warn(f"Ignoring plugin entry point {entry.name}={entry.value}: {name} is a built-in name.", stacklevel=2)
                continue
            specs.setdefault(name, entry.value)
        return specs

    def _accepts(self, spec: str) -> bool:
        """Is the entry point's object of this registry's kind? A plugin that fails to load is skipped with a warning."""
        try:
            return isinstance(_loaded(spec), self._kind)
        except UnsupportedAdapterError as e:
            warnings.warn(f"Ignoring plugin entry point {spec}: {e}", stacklevel=3)
            return False

    @staticmethod
    def refresh() -> None:
        """Forget what was read from the installed entry points (after installing a plugin in this process)."""
        Registry.specs.cache_clear()

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
