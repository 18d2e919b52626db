"""Homomorphic encryption (TenSEAL CKKS): head mode (`head`) and an end-to-end CNN (`cnn`),
with 128-bit parameter checks (`params`).

Importing this package is cheap: names load on first use, so torch-free processes can import
its light modules and `suite list` imports no backend library.
"""

from importlib import import_module

_EXPORTS = {
    "HEBackend": "backend",
    "HEOptions": "options",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "HEBackend": {"track": "inference", "extra": 'he', "requires": ('tenseal',),
                  "install": "pip install -e '.[he]'"},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
