"""One package per privacy technique, each registered under the `suite.backends`
entry-point group. Packages import their heavy library lazily (inside methods), so
listing backends never needs the optional extras.

`lazy_exports` is what every technique package's `__init__` uses: it names what the package
exports and where it lives, and the module is imported on first use, so torch-free processes
(the SPU parties, the enclave) can import a package's light modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that loads `package.<module>` on demand."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
