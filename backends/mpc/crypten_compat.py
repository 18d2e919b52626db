"""The one place where CrypTen 0.4.1 is made importable on current torch.

CrypTen 0.4.1 (its last release) imports, at module level of
`crypten/nn/onnx_converter.py`:

    try:
        import torch.onnx.symbolic_registry as sym_registry   # torch < 1.13
    except ImportError:
        from torch.onnx._internal.registration import registry   # torch 1.13 - 2.x

Modern torch moved that module (to `torch.onnx._internal.torchscript_exporter.registration`),
so `import crypten` fails with `ModuleNotFoundError: torch.onnx._internal.registration`.
The name is only used by CrypTen's ONNX converter (`crypten.nn.from_pytorch` /
`from_onnx`), which is broken on current ONNX exports anyway; `backends.mpc` never calls
it and translates the torch model to CrypTen operations directly.

`import_crypten()` registers a stand-in module under exactly that name whose `registry`
raises a clear error if anything ever uses it, then imports CrypTen. Nothing else is
patched. `tests/test_crypten_compat.py` fails loudly when this stops being true (torch
brings the module back, CrypTen asks for something else, or the import works without
the stand-in), so the shim is revisited instead of silently rotting.

The same function installs the suite's CSPRNG under CrypTen (`backends.mpc.csprng`), so no
code path can import CrypTen through the suite and run it on MT19937.
"""

from __future__ import annotations

import importlib
import sys
import types

#: the module CrypTen 0.4.1 asks for and modern torch no longer has
MISSING_MODULE = "torch.onnx._internal.registration"
#: CrypTen version this shim was written for
CRYPTEN_VERSION = "0.4.1"


class _UnusableRegistry:
    """Placeholder for torch's ONNX symbolic registry: CrypTen's ONNX path is unsupported."""

    def __getattr__(self, name: str):
        raise RuntimeError(
            "CrypTen's ONNX converter is not supported with this torch (it needs "
            f"{MISSING_MODULE}.registry.{name}); backends.mpc translates models directly"
        )


def stand_in_needed() -> bool:
    """True when torch lacks the module CrypTen imports (and no stand-in is installed yet)."""
    if MISSING_MODULE in sys.modules:
        return bool(getattr(sys.modules[MISSING_MODULE], "__crypten_stand_in__", False))
    try:
        importlib.import_module(MISSING_MODULE)
    except ModuleNotFoundError:
        return True
    return False


def install_stand_in() -> types.ModuleType | None:
    """Register the stand-in under MISSING_MODULE if torch lacks it; return it (or None)."""
    existing = sys.modules.get(MISSING_MODULE)
    if existing is not None:
        return existing if getattr(existing, "__crypten_stand_in__", False) else None
    try:
        importlib.import_module(MISSING_MODULE)
        return None                      # torch has it again: nothing to do
    except ModuleNotFoundError:
        pass
    module = types.ModuleType(MISSING_MODULE, "stand-in installed by backends.mpc.crypten_compat")
    module.registry = _UnusableRegistry()
    module.__crypten_stand_in__ = True
    sys.modules[MISSING_MODULE] = module
    return module


def import_crypten(rng: str = "csprng"):
    """Import and return the `crypten` package, installing the stand-in first if needed,
    with its randomness routed through `backends.mpc.csprng` (AES-256-CTR keyed from
    os.urandom) for the next `crypten.init()`. rng="torch" keeps CrypTen's stock MT19937
    generators: insecure, only for measuring the CSPRNG's cost."""
    from backends.mpc import csprng, ring

    csprng.set_mode(rng)
    if "crypten" not in sys.modules:
        install_stand_in()
    import crypten

    csprng.install(crypten)
    ring.install(crypten)          # int64 products on float64 kernels, bit for bit
    return crypten
