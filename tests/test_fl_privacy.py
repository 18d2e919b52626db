"""Local DP of the fl backend: calibration for sensitivity 2 x clip, composition over rounds,
CSPRNG noise, each cross-checked independently and each with a positive control."""

from __future__ import annotations

import math
from importlib.util import find_spec

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(find_spec("dp_accounting") is None or find_spec("flwr") is None,
                                reason="needs the [fl] extra (flwr, dp-accounting)")


def _pld_epsilon(std: float, sensitivity: float, releases: int, delta: float) -> float:
    import dp_accounting as dpa

    acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dpa.GaussianDpEvent(std / sensitivity), releases)
    return acc.get_epsilon(delta)


def _rdp_epsilon(std: float, sensitivity: float, releases: int, delta: float) -> float:
    import dp_accounting as dpa

    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.GaussianDpEvent(std / sensitivity), releases)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("epsilon,delta,clip,rounds", [(10.0, 1e-5, 1.0, 1), (10.0, 1e-5, 1.0, 20),
                                                       (1.0, 1e-5, 0.5, 5), (0.5, 1e-3, 2.0, 3),
                                                       (4.0, 1e-6, 1.0, 50)])
def test_epsilon_matches_dp_accounting(epsilon, delta, clip, rounds):
    """Our closed form (analytic Gaussian + exact GDP composition) against Google's PLD
    accountant, with the RDP accountant as an upper bound."""
    from backends.fl.privacy import calibrate_std, composed_epsilon

    std = calibrate_std(epsilon, delta, clip)
    ours = composed_epsilon(std, clip, rounds, delta)
    pld = _pld_epsilon(std, 2 * clip, rounds, delta)
    assert ours == pytest.approx(pld, rel=5e-3, abs=5e-3)
    assert ours <= _rdp_epsilon(std, 2 * clip, rounds, delta) + 1e-6
    if rounds == 1:
        assert ours == pytest.approx(epsilon, rel=1e-6)


def test_flowers_calibration_overstates_the_guarantee():
    """Positive control: Flower LocalDpMod's std (sensitivity = clip, classic formula) at a
    claimed epsilon of 10 is far from (10, delta)-DP for updates that differ by 2 x clip,
    and the independent accountant says so; ours is at the claim."""
    from backends.fl.privacy import calibrate_std, classic_std

    claimed, delta, clip = 10.0, 1e-5, 1.0
    flower = classic_std(claimed, delta, clip)
    assert _pld_epsilon(flower, 2 * clip, 1, delta) > 2 * claimed
    assert _pld_epsilon(calibrate_std(claimed, delta, clip), 2 * clip, 1, delta) == pytest.approx(
        claimed, rel=5e-3)


def test_threat_model_and_rows_state_the_corrected_epsilon():
    from backends.fl.backend import FLBackend, FLOptions, ldp_rows
    from backends.fl.privacy import calibrate_std

    o = FLOptions(privacy="ldp", rounds=4, ldp_epsilon=2.0, ldp_delta=1e-5, clip=0.5)
    std = calibrate_std(2.0, 1e-5, 0.5)
    total = _pld_epsilon(std, 1.0, 4, 1e-5)
    tm = FLBackend(o).threat_model()
    assert "sensitivity 2 x clip" in tm.guarantee and f"epsilon={total:.3g}" in tm.guarantee
    assert any("in clear" in leak for leak in tm.leaks)
    rows = ldp_rows(o, {"rounds": [{"round": r} for r in (1, 2, 3, 4)]})
    final = [r for r in rows if r["metric"] == "epsilon" and "round" not in r]
    assert final[0]["value"] == pytest.approx(total, rel=5e-3)
    curve = [r["value"] for r in rows if r["metric"] == "epsilon" and "round" in r]
    assert curve[0] == pytest.approx(2.0, rel=1e-6) and curve == sorted(curve)


def _arrays(seed: int, n: int = 3, size: int = 2000):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=size).astype(np.float32) for _ in range(n)]


def _run_mod(mod, sent, trained):
    """Call a client mod the way a ClientApp does: train message in, reply out."""
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    keys = [f"a{i}" for i in range(len(sent))]
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in zip(keys, sent)})}),
                  dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"

    def call_next(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in zip(keys, trained)})}),
                       reply_to=m)

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    out = mod(msg, ctx, call_next)
    rec = out.content["arrays"]
    return [rec[k].numpy() for k in keys]


def test_local_dp_mod_clips_to_clip_and_adds_calibrated_noise():
    from backends.fl.privacy import local_dp_mod

    sent, trained = _arrays(0), _arrays(1)
    clip = 0.7
    clipped = _run_mod(local_dp_mod(clip, 0.0), sent, trained)
    update = np.concatenate([c - s for c, s in zip(clipped, sent)])
    assert np.linalg.norm(update) == pytest.approx(clip, rel=1e-4)
    direction = np.concatenate([t - s for t, s in zip(trained, sent)])
    assert np.dot(update, direction) / (np.linalg.norm(update) * np.linalg.norm(direction)) > 0.9999
    noised = _run_mod(local_dp_mod(clip, 0.3), sent, trained)
    noise = np.concatenate([n - c for n, c in zip(noised, clipped)])
    assert noise.std() == pytest.approx(0.3, rel=0.05) and abs(noise.mean()) < 0.02


def test_noise_is_not_reproducible_from_a_published_seed():
    """Our noise comes from the OS CSPRNG: re-seeding every generator the run names does not
    give it back. Positive control: Flower's LocalDpMod draws from NumPy's global generator,
    so an adversary who knows the seed regenerates its noise exactly."""
    from flwr.clientapp.mod import LocalDpMod

    from backends.fl.privacy import local_dp_mod

    sent, trained = _arrays(0), _arrays(1)
    outs = []
    for _ in range(2):
        np.random.seed(0)
        outs.append(np.concatenate(_run_mod(local_dp_mod(1.0, 0.5), sent, trained)))
    assert not np.allclose(outs[0], outs[1])
    flower = []
    for _ in range(2):
        np.random.seed(0)
        flower.append(np.concatenate(_run_mod(LocalDpMod(1.0, 1.0, 10.0, 1e-5), sent, trained)))
    assert np.array_equal(flower[0], flower[1])


def test_csprng_normal_is_standard_normal():
    from scipy import stats

    from backends.fl.privacy import csprng_normal

    z = csprng_normal((20001,), 1.0)
    assert z.shape == (20001,)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert math.isfinite(float(z.max()))
