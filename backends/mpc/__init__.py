"""Two-party secure inference: CrypTen (`crypten_engine`) and SecretFlow SPU (`spu_engine`)
engines over one torch-free plan (`graph`, built by `plan`), with shared party orchestration
(`parties`, `party_process`) and the suite's own two-party gates (`protocol`).

Names load on first use (backends.lazy_exports).
"""

from backends import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
