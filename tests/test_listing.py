"""`suite list` is cheap and truthful: it imports no torch and no backend library, and what
it shows (track, extra, requirements) is what the backend classes themselves declare."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from suite.registry_backends import BACKENDS

HEAVY = ("torch", "torchvision", "torchxrayvision", "crypten", "tenseal", "opacus", "flwr", "ray",
         "cryptography", "jax", "spu", "sklearn", "backends.mpc.backend", "backends.he.backend",
         "backends.tee.backend", "backends.dp.backend", "backends.fl.backend",
         "backends.reference.plaintext", "backends.reference.null")


def test_list_imports_no_torch_and_no_backend():
    code = ("import io, json, sys\n"
            "from rich.console import Console\n"
            "from suite.commands import cmd_list\n"
            "cmd_list(None, Console(file=io.StringIO()))\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert imported == [], f"`suite list` imported {imported}"


def test_positive_control_loading_a_backend_is_seen():
    """The check above would notice: loading one backend class pulls its modules in."""
    code = ("import json, sys\n"
            "from suite.registry_backends import BACKENDS\n"
            "BACKENDS.load('plaintext')\n"
            "print(json.dumps('backends.reference.plaintext' in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True


@pytest.mark.parametrize("name", BACKENDS.names())
def test_listing_matches_the_class(name):
    info = BACKENDS.listing(name)
    cls = BACKENDS.load(name)
    assert info["track"] == cls.track
    assert info["extra"] == cls.extra
    assert tuple(info["requires"]) == tuple(cls.requires)
    assert info["install"]
