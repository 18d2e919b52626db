"""One generic registry, fed by entry points and loaded lazily.

Listing never imports an entry: a backend whose optional library is missing still
shows up in `suite list` and only fails (clearly) when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from suite.errors import BackendUnavailable, SuiteError, unknown

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Names to `module:attr` targets; duplicate names are rejected."""

    kind: str
    group: str | None = None
    _targets: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, T] = field(default_factory=dict)
    _discovered: bool = False

    def register(self, name: str, target: str) -> None:
        if name in self._targets and self._targets[name] != target:
            raise SuiteError(f"duplicate {self.kind} name '{name}': {self._targets[name]} and {target}")
        self._targets[name] = target

    def _discover(self) -> None:
        if self._discovered or self.group is None:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            self.register(ep.name, ep.value)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._targets)

    def target(self, name: str) -> str:
        self._discover()
        if name not in self._targets:
            raise unknown(self.kind, name, self._targets)
        return self._targets[name]

    def listing(self, name: str) -> dict[str, Any]:
        """What `suite list` shows (track, extra, requires, install), read from the module's
        `LISTING` table so nothing heavy is imported; an entry without one is loaded."""
        module_name, _, attr = self.target(name).partition(":")
        try:
            table = getattr(import_module(module_name), "LISTING", {})
        except ImportError:
            table = {}
        if attr in table:
            return dict(table[attr])
        obj: Any = self.load(name)
        extra = getattr(obj, "extra", None)
        return {"track": getattr(obj, "track", "?"), "extra": extra,
                "requires": tuple(getattr(obj, "requires", ())),
                "install": f"pip install -e '.[{extra}]'" if extra else "pip install -e ."}

    def load(self, name: str) -> T:
        """Import and return the entry; a missing optional library becomes BackendUnavailable."""
        if name in self._loaded:
            return self._loaded[name]
        module_name, _, attr = self.target(name).partition(":")
        try:
            module = import_module(module_name)
        except ImportError as exc:
            if getattr(exc, "name", None) and module_name.startswith(exc.name):
                raise BackendUnavailable(
                    f"{self.kind} '{name}' is registered but its module '{module_name}' "
                    f"is not in this installation"
                ) from exc
            raise BackendUnavailable(
                f"{self.kind} '{name}' is unavailable: {exc}. "
                f"Install its extra: pip install -e '.[{name}]'"
            ) from exc
        obj: Any = getattr(module, attr) if attr else module
        self._loaded[name] = obj
        return obj
