"""A trusted execution environment with real cryptography on simulated hardware: the client
(`client`), the enclave (`enclave`), the simulated CPU and vendor (`hardware`) and the wire
protocol (`protocol`).

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

_EXPORTS = {
    "TEEBackend": "backend",
    "TEEOptions": "backend",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "TEEBackend": {"track": "inference", "extra": 'tee', "requires": ('cryptography',),
                   "install": "pip install -e '.[tee]'"},
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
