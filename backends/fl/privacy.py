"""Local DP for a site's update: calibration, accounting and CSPRNG noise.

Why not Flower's LocalDpMod as is: it calibrates with the classic Gaussian formula
std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, which is a valid bound only for
epsilon < 1, and it draws the noise from NumPy's global Mersenne Twister. Two updates
clipped to norm C can differ by up to 2C (replace one site's whole dataset), so the
L2 sensitivity is 2C.

Here the noise is calibrated with the analytic Gaussian mechanism (Balle & Wang 2018),
exact for every epsilon: a Gaussian release with sensitivity D and noise std s is
mu-GDP with mu = D / s, whose (epsilon, delta) curve is

    delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon * Phi(-epsilon/mu - mu/2).

R releases with the same mu compose exactly to (mu * sqrt(R))-GDP, so the epsilon over all
rounds is the same formula with mu * sqrt(R). tests/test_fl_privacy.py cross-checks both
against Google's `dp_accounting` (PLD accountant). Clipping is Flower's own
(`compute_clip_model_update`); the noise comes from the OS CSPRNG (`os.urandom`).
"""

from __future__ import annotations

import math
import os

import numpy as np


def sensitivity(clip: float) -> float:
    """L2 distance between two updates clipped to `clip`: at most 2 x clip."""
    return 2.0 * float(clip)


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (analytic Gaussian), computed in log space."""
    from scipy.special import log_ndtr, ndtr

    if mu <= 0:
        return 0.0
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return float(max(0.0, ndtr(a) - math.exp(epsilon + log_ndtr(b))))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for a mu-GDP mechanism (bisection)."""
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gdp_delta(mid, mu) <= delta else (mid, hi)
    return hi


def calibrate_std(epsilon: float, delta: float, clip: float) -> float:
    """Noise std that makes one release of a 2C-sensitive update (epsilon, delta)-DP."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError("local DP needs epsilon > 0 and 0 < delta < 1")
    lo, hi = 1e-6, 1.0          # bisection on mu = sensitivity / std (delta grows with mu)
    while gdp_delta(epsilon, hi) < delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(epsilon, mid) <= delta else (lo, mid)
    return sensitivity(clip) / lo


def composed_epsilon(std: float, clip: float, releases: int, delta: float) -> float:
    """epsilon after `releases` noised updates of one site (exact GDP composition)."""
    mu = sensitivity(clip) / std
    return gdp_epsilon(mu * math.sqrt(max(0, releases)), delta)


def classic_std(epsilon: float, delta: float, sensitivity_value: float) -> float:
    """Flower LocalDpMod's std (the classic bound, valid only for epsilon < 1): for contrast."""
    return sensitivity_value * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def csprng_normal(shape, std: float) -> np.ndarray:
    """Gaussian noise from the OS CSPRNG: Box-Muller over 53-bit uniforms from os.urandom."""
    n = int(np.prod(shape))
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0 ** 53     # in (0, 1]
    r = np.sqrt(-2.0 * np.log(u[0]))
    z = np.concatenate([r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])])[:n]
    return (z * std).reshape(shape)


def local_dp_mod(clip: float, std: float):
    """A ClientApp mod: clip the site's update to `clip` (Flower's own clipping) and add
    N(0, std^2) from the CSPRNG to every coordinate before the reply leaves the site."""

    def mod(msg, context, call_next):
        from flwr.app import Array, ArrayRecord

        try:
            from flwr.supercore.differential_privacy import compute_clip_model_update
        except ImportError:       # older Flower
            from flwr.common.differential_privacy import compute_clip_model_update

        sent = next(iter(msg.content.array_records.values()))
        out = call_next(msg, context)
        if out.has_error() or len(out.content.array_records) != 1:
            return out
        key, record = next(iter(out.content.array_records.items()))
        arrays = record.to_numpy_ndarrays()
        compute_clip_model_update(arrays, sent.to_numpy_ndarrays(), clip)
        noised = [(a + csprng_normal(a.shape, std)).astype(a.dtype) for a in arrays]
        out.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(record.keys(), noised)})
        return out

    return mod
