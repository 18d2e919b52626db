"""The CrypTen import shim stays necessary, sufficient and minimal.

Each check runs in a fresh interpreter: `import crypten` mutates sys.modules for good. When
one of these fails, CrypTen's or torch's import behaviour changed: revisit
backends/mpc/crypten_compat.py (and delete it if CrypTen now imports cleanly).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from backends.mpc import crypten_compat

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(find_spec("crypten") is None, reason="needs the [mpc] extra")


PROBE = r"""
import json, sys
out = {}
from backends.mpc.crypten_compat import MISSING_MODULE, CRYPTEN_VERSION, import_crypten, stand_in_needed
out["needed_before"] = stand_in_needed()
try:
    import crypten  # noqa: F401  - without the stand-in
    out["plain_import"] = "IMPORTED"
except ModuleNotFoundError as exc:
    out["plain_import"] = f"MISSING {exc.name}"
for name in [m for m in sys.modules if m == "crypten" or m.startswith("crypten.")]:
    del sys.modules[name]
crypten = import_crypten()
stand_in = sys.modules[MISSING_MODULE]
from crypten.nn import onnx_converter
out["stand_in_flag"] = bool(getattr(stand_in, "__crypten_stand_in__", False))
out["bound"] = onnx_converter.registry is stand_in.registry
out["version"] = crypten.__version__
out["expected_version"] = CRYPTEN_VERSION
try:
    onnx_converter.registry.register
    out["refuses_use"] = False
except RuntimeError as exc:
    out["refuses_use"] = "not supported" in str(exc)
out["needed_after"] = stand_in_needed()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """One fresh interpreter (importing torch + CrypTen is slow on a shared box)."""
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_crypten_still_asks_for_the_module_the_shim_provides():
    """CrypTen's converter imports exactly `registry` from MISSING_MODULE (nothing else)."""
    import importlib.util

    source = Path(importlib.util.find_spec("crypten").origin).parent / "nn" / "onnx_converter.py"
    text = source.read_text()
    imports = re.findall(r"^\s*from (torch\.onnx\._internal[\w.]*) import (\w+)", text, re.M)
    assert imports == [(crypten_compat.MISSING_MODULE, "registry")], (
        f"CrypTen now imports {imports} from torch.onnx internals; update backends/mpc/crypten_compat.py")


def test_plain_import_fails_without_the_stand_in(probe):
    """If this starts passing imports, torch or CrypTen changed: the shim may be obsolete."""
    assert probe["needed_before"] is True
    assert probe["plain_import"] == f"MISSING {crypten_compat.MISSING_MODULE}", (
        f"`import crypten` without the stand-in now gives {probe['plain_import']!r}: "
        "CrypTen's import behaviour changed; revisit backends/mpc/crypten_compat.py")


def test_import_works_with_the_stand_in_and_crypten_bound_it(probe):
    assert probe["stand_in_flag"] and probe["needed_after"]
    assert probe["bound"], "crypten did not bind the stand-in registry"
    assert probe["version"] == probe["expected_version"]
    assert probe["refuses_use"], "the stand-in registry must refuse use with a clear error"
