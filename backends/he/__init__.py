"""Homomorphic encryption (TenSEAL CKKS): head mode (`head`) and an end-to-end CNN (`cnn`),
with 128-bit parameter checks (`params`).

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
