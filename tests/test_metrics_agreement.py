"""Output agreement: hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from suite.metrics.agreement import agreement

KEYS = {
    "max_abs_diff", "mean_abs_diff", "ks_stat", "ks_p", "wasserstein",
    "ba_bias", "ba_loa_low", "ba_loa_high", "decision_agreement",
}


def test_hand_computed_values():
    ref = [0.1, 0.4, 0.6, 0.9]
    test = [0.2, 0.4, 0.4, 0.8]          # diff = test - ref = [0.1, 0, -0.2, -0.1]
    out = agreement(ref, test)
    assert set(out) == KEYS
    assert all(isinstance(v, float) for v in out.values())
    sd = math.sqrt(0.05 / 3)             # deviations 0.15, 0.05, -0.15, -0.05 from -0.05
    expected = {
        "max_abs_diff": 0.2,
        "mean_abs_diff": 0.1,
        "ks_stat": 0.25,                 # ECDFs differ by at most one step of 1/4
        "wasserstein": 0.1,              # mean |sorted test - sorted ref| = (.1+0+.2+.1)/4
        "ba_bias": -0.05,
        "ba_loa_low": -0.05 - 1.96 * sd,
        "ba_loa_high": -0.05 + 1.96 * sd,
        "decision_agreement": 0.75,      # only 0.6 -> 0.4 crosses 0.5
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out["ks_p"] == pytest.approx(ks_2samp(test, ref).pvalue)


def test_identical_arrays():
    p = np.linspace(0.0, 1.0, 11)
    out = agreement(p, p.copy())
    for key in ("max_abs_diff", "mean_abs_diff", "ks_stat", "wasserstein",
                "ba_bias", "ba_loa_low", "ba_loa_high"):
        assert out[key] == 0.0, key
    assert out["ks_p"] == 1.0
    assert out["decision_agreement"] == 1.0


def test_single_image_has_zero_sd():
    out = agreement([0.3], [0.5])
    assert out["ba_bias"] == pytest.approx(0.2)
    assert out["ba_loa_low"] == out["ba_loa_high"] == out["ba_bias"]


def test_threshold_is_inclusive_and_configurable():
    assert agreement([0.5], [0.49])["decision_agreement"] == 0.0
    assert agreement([0.5, 0.2], [0.6, 0.25], threshold=0.22)["decision_agreement"] == 0.5


@pytest.mark.parametrize("ref, test", [
    ([0.1, 0.2], [0.1]),
    ([], []),
    ([[0.1, 0.2]], [[0.1, 0.2]]),
    ([0.1, np.nan], [0.1, 0.2]),
])
def test_bad_inputs_raise(ref, test):
    with pytest.raises(ValueError):
        agreement(ref, test)
