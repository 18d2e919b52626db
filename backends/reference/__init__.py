"""The reference rows: plaintext inference and the harness-overhead floor (`null`).

Importing this package is cheap: names load on first use, so torch-free processes can import
its light modules and `suite list` imports no backend library.
"""

from importlib import import_module

_EXPORTS = {
    "PlaintextBackend": "plaintext",
    "NullBackend": "null",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "PlaintextBackend": {"track": "reference", "extra": None, "requires": (),
                         "install": 'pip install -e .'},
    "NullBackend": {"track": "reference", "extra": None, "requires": (),
                    "install": 'pip install -e .'},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
