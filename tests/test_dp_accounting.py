"""The dp backend's epsilon, cross-checked with an independent accountant (Google's dp_accounting).

Same mechanism (Poisson-subsampled Gaussian), noise multiplier, sampling rate, steps and delta:
  Opacus RDP vs dp_accounting RDP  agree within 1% (same analysis, different code and orders)
  Opacus PRV vs dp_accounting PLD  agree within 3% (both near-exact numerical accountants)
and the near-exact accountants never exceed RDP (RDP is an upper bound).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("opacus")
dp_accounting = pytest.importorskip("dp_accounting")

from backends.dp.training import epsilon_for, noise_for_epsilon, steps_and_rate  # noqa: E402

RDP_TOLERANCE = 0.01
PLD_TOLERANCE = 0.03

# (noise multiplier, sampling rate, steps, delta): the default head sweep and a full-scope run
CASES = [(6.33, 1 / 7, 140, 1 / 16800), (2.53, 1 / 7, 140, 1 / 16800),
         (1.27, 1 / 7, 140, 1 / 16800), (1.1, 64 / 1680, 162, 1e-5)]


def _event(sigma, q, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_rdp_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon_for(sigma, q, steps, delta, "rdp")
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(_event(sigma, q, steps))
    theirs = acc.get_epsilon(delta)
    assert ours == pytest.approx(theirs, rel=RDP_TOLERANCE)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES[1:2] + CASES[3:])
def test_prv_matches_dp_accounting_pld(sigma, q, steps, delta):
    ours = epsilon_for(sigma, q, steps, delta, "prv")
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(_event(sigma, q, steps))
    theirs = acc.get_epsilon(delta)
    assert ours == pytest.approx(theirs, rel=PLD_TOLERANCE)
    assert ours <= epsilon_for(sigma, q, steps, delta, "rdp") + 1e-9


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_solved_noise_reaches_target_from_below(target):
    steps, q = steps_and_rate(1680, 256, 20)
    delta = 1 / 16800
    sigma = noise_for_epsilon(target, delta, q, steps, "rdp")
    eps = epsilon_for(sigma, q, steps, delta, "rdp")
    assert eps <= target
    assert eps >= target - 0.02        # Opacus' search tolerance is 0.01


def test_no_noise_means_no_guarantee():
    assert math.isinf(epsilon_for(0.0, 0.1, 10, 1e-5))
