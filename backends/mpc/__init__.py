"""Two-party secure inference: CrypTen (`crypten_engine`) and SecretFlow SPU (`spu_engine`)
engines over one torch-free plan (`graph`, built by `plan`), with shared party orchestration
(`parties`, `party_process`) and the suite's own two-party gates (`protocol`).

Importing this package is cheap: names load on first use, so torch-free processes can import
its light modules and `suite list` imports no backend library.
"""

from importlib import import_module

_EXPORTS = {
    "MPCBackend": "backend",
    "MPCOptions": "options",
    "MPCPartyError": "parties",
    "free_port": "parties",
}
__all__ = sorted(_EXPORTS)

# What `suite list` shows without importing the backend (and so its library); a test
# checks it against the classes' own attributes.
LISTING = {
    "MPCBackend": {"track": "inference", "extra": 'mpc', "requires": ('crypten', 'omegaconf', 'yaml'),
                   "install": 'bash scripts/setup.sh (CrypTen 0.4.1 installs with --no-deps; engine=spu gets its own .venv-spu/)'},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
