"""Differentially private training with Opacus DP-SGD (`training`) and its controls.

Importing this package is cheap: names load on first use, so torch-free processes can import
its light modules and `suite list` imports no backend library.
"""

from importlib import import_module

_EXPORTS = {
    "DPBackend": "backend",
    "DPOptions": "backend",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "DPBackend": {"track": "training", "extra": 'dp', "requires": ('opacus', 'dp_accounting'),
                  "install": "pip install -e '.[dp]'"},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
