"""Differentially private training with Opacus DP-SGD (`training`) and its controls.

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
