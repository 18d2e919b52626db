"""The reference rows: plaintext inference and the harness-overhead floor (`null`).

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
