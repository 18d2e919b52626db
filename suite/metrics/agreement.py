"""Agreement of a backend's probabilities with the reference's, image by image.

A privacy technique can keep AUROC while moving individual outputs (fixed-point
rounding, noise), so we report how far outputs move, whether their distribution
shifts, and whether the decision changes.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance

# Bland-Altman limits of agreement: bias +- this many standard deviations.
_LOA_Z = 1.96


def _pair(p_ref, p_test) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D arrays of equal, non-zero length: the images must be paired."""
    a = np.asarray(p_ref, dtype=float)
    b = np.asarray(p_test, dtype=float)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"expected 1-D arrays, got shapes {a.shape} and {b.shape} (ravel to pool labels)")
    if a.size != b.size:
        raise ValueError(f"p_ref has {a.size} images but p_test has {b.size}")
    if a.size == 0:
        raise ValueError("no images to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("probabilities must be finite")
    return a, b


def bland_altman(diff: np.ndarray) -> tuple[float, float, float]:
    """Bias and limits of agreement of paired differences; one image has sd 0, since a
    single difference says nothing about spread."""
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    return bias, bias - _LOA_Z * sd, bias + _LOA_Z * sd


def agreement(p_ref, p_test, threshold: float = 0.5) -> dict[str, float]:
    """Output agreement of p_test with p_ref. A decision is positive when p >= threshold;
    Bland-Altman differences are p_test - p_ref."""
    ref, test = _pair(p_ref, p_test)
    diff = test - ref
    ks = ks_2samp(test, ref)
    bias, loa_low, loa_high = bland_altman(diff)
    return {
        "max_abs_diff": float(np.abs(diff).max()),
        "mean_abs_diff": float(np.abs(diff).mean()),
        "ks_stat": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "wasserstein": float(wasserstein_distance(test, ref)),
        "ba_bias": bias,
        "ba_loa_low": loa_low,
        "ba_loa_high": loa_high,
        "decision_agreement": float(np.mean((ref >= threshold) == (test >= threshold))),
    }
