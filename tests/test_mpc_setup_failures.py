"""Killing a party during MPC setup ends the backend with a clear error within seconds.

Each party (model owner, data owner, dealer) is SIGKILLed shortly after it starts (while it
imports CrypTen, meets the others and shares the model); the backend must raise
MPCPartyError naming that party within seconds, and teardown must leave no process behind.
"""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from tests.mpc_support import kill_party_during_setup

pytestmark = pytest.mark.skipif(find_spec("crypten") is None, reason="needs the [mpc] extra")

ARCH = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)


@pytest.mark.parametrize("victim,delay", [(0, 0.3), (1, 2.0), (2, 1.0)])
def test_killing_a_party_during_setup_fails_fast(victim, delay, tmp_path):
    from backends.mpc import MPCBackend, MPCOptions, MPCPartyError
    from suite.backend import BackendContext
    from suite.meter import CommMeter
    from suite.models import ModelBundle, build_densenet

    torch.manual_seed(0)
    bundle = ModelBundle(net=build_densenet(ARCH, 2).eval(), name="tiny-setup", architecture=ARCH,
                         pathologies=["a", "b"], resolution=32, source="test")
    backend = MPCBackend(MPCOptions(triples="ttp", batch_size=1, timeout_s=600))
    ctx = BackendContext(model=bundle, meter=CommMeter(), workdir=tmp_path, threads=2)
    exc, seconds = kill_party_during_setup(backend, ctx, victim, delay)
    assert isinstance(exc, MPCPartyError), repr(exc)
    who = {0: "model owner", 1: "data owner", 2: "triple dealer"}[victim]
    assert f"{who} (party {victim}) exited (killed by signal 9)" in str(exc), str(exc)
    assert seconds < 15, seconds
