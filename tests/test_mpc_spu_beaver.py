"""Which triple sources SPU 0.9.5's SEMI2K accepts, pinned so the SPU row's label stays true.

SEMI2K in SPU 0.9.5 implements two Beaver sources: TrustedFirstParty (BeaverTfpUnsafe: party 0
makes every triple, which is what the suite's SEMI2K row runs and labels "TRUSTED FIRST PARTY")
and TrustedThirdParty (BeaverTtp), which is only a client: it needs `ttp_beaver_config` with
the host of SPU's beaver TTP server, and the wheel ships no such server (its gRPC service
methods are the unimplemented stubs), so a third-party dealer cannot be offered without
building SPU from source. MultiParty is refused ("unsupported beaver type 2").
"""

from __future__ import annotations

import subprocess

import pytest

PROBE = r"""
import numpy as np, spu.libspu as L
from spu.utils import simulation as sim
for bt in ("TrustedFirstParty", "TrustedThirdParty", "MultiParty"):
    cfg = L.RuntimeConfig(protocol=L.ProtocolKind.SEMI2K, field=L.FieldType.FM64)
    cfg.beaver_type = getattr(L.RuntimeConfig.BeaverType, bt)
    try:
        out = sim.sim_jax(sim.Simulator(2, cfg), lambda x, y: x * y)(np.full(3, 2.0), np.full(3, 3.0))
        print(bt, "ok", float(out[0]))
    except Exception as exc:
        text = str(exc)
        print(bt, "refused", "needs-ttp-config" if "has_ttp_beaver_config" in text else
              "unsupported" if "unsupported beaver type" in text else text[:80].replace(chr(10), " "))
"""


def test_spu_semi2k_beaver_types():
    from backends.mpc.spu_engine import spu_available, spu_python

    if not spu_available():
        pytest.skip("needs .venv-spu/ (bash scripts/setup.sh)")
    out = subprocess.run([str(spu_python()), "-c", PROBE], capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("Trusted", "Multi")))
    assert lines == {"TrustedFirstParty": "ok 6.0", "TrustedThirdParty": "refused needs-ttp-config",
                     "MultiParty": "refused unsupported"}, out.stdout + out.stderr[-2000:]
