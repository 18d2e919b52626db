"""Latency summary: hand-computed percentiles and throughput."""

from __future__ import annotations

import pytest

from suite.metrics.perf import latency_summary


def test_hand_computed_summary():
    out = latency_summary([1.0, 2.0, 0.5], [10, 10, 5])
    # per image [0.1, 0.2, 0.1]; linear p95 of 3 values sits at rank 1.9
    expected = {
        "latency_per_image_p50": 0.1,
        "latency_per_image_p95": 0.19,
        "latency_per_batch_p50": 1.0,
        "latency_per_batch_p95": 1.9,
        "throughput": 25 / 3.5,
        "online_time": 3.5,
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
        assert isinstance(out[key], float)


def test_single_batch():
    out = latency_summary([0.4], [8])
    assert out["latency_per_image_p50"] == out["latency_per_image_p95"] == pytest.approx(0.05)
    assert out["throughput"] == pytest.approx(20.0)


@pytest.mark.parametrize("secs, sizes", [
    ([], []),
    ([1.0], [1, 2]),
    ([1.0], [0]),
    ([-1.0], [1]),
])
def test_bad_inputs_raise(secs, sizes):
    with pytest.raises(ValueError):
        latency_summary(secs, sizes)
