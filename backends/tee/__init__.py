"""A trusted execution environment with real cryptography on simulated hardware: the client
(`client`), the enclave (`enclave`), the simulated CPU and vendor (`hardware`) and the wire
protocol (`protocol`).

Importing this package is cheap: names load on first use, so torch-free processes can import
its light modules and `suite list` imports no backend library.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
