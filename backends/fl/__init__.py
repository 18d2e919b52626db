"""Federated training across hospital sites with Flower: the apps (`app`) and the simulation
and deployment engines (`engine`).

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

_EXPORTS = {
    "FLBackend": "backend",
    "FLOptions": "backend",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "FLBackend": {"track": "training", "extra": 'fl', "requires": ('flwr', 'ray'),
                  "install": "pip install -e '.[fl]'"},
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
