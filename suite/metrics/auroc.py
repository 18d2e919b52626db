"""AUROC with DeLong and bootstrap confidence intervals.

Everything here is a pure function of label and score arrays. Per-label CIs use
DeLong's variance (ci_method "delong"), paired differences against a reference use the
paired DeLong test ("delong_paired"), and macro averages over labels use a percentile
bootstrap over images ("bootstrap_percentile"), because DeLong has no closed form for
a mean over labels with different labelled subsets.

DeLong's variance is computed with the O(n log n) midrank algorithm of Sun & Xu (2014),
"Fast implementation of DeLong's algorithm for comparing the areas under correlated
receiver operating characteristic curves", IEEE Signal Processing Letters 21(11).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

# |delta| below this is a tie in AUC (AUCs are multiples of 1/(2 n_pos n_neg), so any
# real difference is far larger for any data set this suite will ever see).
_DELTA_TOL = 1e-12
# Variance at or below this is zero: structural components are multiples of 1/(2n),
# so a real variance is many orders of magnitude larger.
_VAR_TOL = 1e-30
# Bootstrap works on [resamples, images] count matrices; cap their size (elements).
_BOOT_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class AurocCI:
    auc: float
    ci_low: float
    ci_high: float
    variance: float
    n: int
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class PairedDeLong:
    auc_a: float
    auc_b: float
    delta: float      # auc_a - auc_b
    ci_low: float     # of delta
    ci_high: float
    z: float
    p_value: float
    n: int


# ---------------------------------------------------------------- inputs


def _labelled(y_true, *score_arrays) -> tuple[np.ndarray, list[np.ndarray]]:
    """Drop images with a NaN label; reject anything but 0/1 labels and finite scores,
    so a bad input fails loudly instead of becoming a plausible number."""
    y = np.asarray(y_true, dtype=float).ravel()
    scores = [np.asarray(s, dtype=float).ravel() for s in score_arrays]
    for s in scores:
        if s.shape != y.shape:
            raise ValueError(f"y_true has {y.size} entries but scores have {s.size}")
    keep = ~np.isnan(y)
    y = y[keep]
    scores = [s[keep] for s in scores]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    for s in scores:
        if not np.isfinite(s).all():
            raise ValueError("scores of labelled images must be finite")
    return y.astype(bool), scores


# ---------------------------------------------------------------- point estimate


def auroc(y_true, scores) -> float:
    """Mann-Whitney AUROC with mid-ranks for ties (a tied positive/negative pair counts
    one half); nan when only one class is labelled."""
    y, (s,) = _labelled(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------- DeLong


def _structural_components(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong's structural components V10 (one per positive) and V01 (one per
    negative) for k score rows, from three midrankings (Sun & Xu 2014).

    y: bool [N]; scores: [k, N]. Returns auc [k], v10 [k, n_pos], v01 [k, n_neg].
    """
    pos, neg = scores[:, y], scores[:, ~y]
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    t_pos = rankdata(pos, axis=1)                                   # among positives
    t_neg = rankdata(neg, axis=1)                                   # among negatives
    t_all = rankdata(np.concatenate([pos, neg], axis=1), axis=1)    # among all
    v10 = (t_all[:, :n_pos] - t_pos) / n_neg        # share of negatives below each positive
    v01 = 1.0 - (t_all[:, n_pos:] - t_neg) / n_pos  # share of positives above each negative
    auc = v10.mean(axis=1)
    return auc, v10, v01


def _cov(v: np.ndarray) -> np.ndarray:
    """Sample covariance (ddof=1) of the rows of v [k, n]; nan when n < 2, where DeLong's
    estimator is undefined."""
    k, n = v.shape
    if n < 2:
        return np.full((k, k), math.nan)
    return np.atleast_2d(np.cov(v, ddof=1))


def _delong_cov(y: np.ndarray, scores: np.ndarray):
    """AUCs [k] and DeLong's covariance matrix S = S10/n_pos + S01/n_neg [k, k]."""
    auc, v10, v01 = _structural_components(y, scores)
    s = _cov(v10) / v10.shape[1] + _cov(v01) / v01.shape[1]
    return auc, s


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    n_pos = int(y.sum())
    return n_pos, int(y.size - n_pos)


def delong_ci(y_true, scores, alpha: float = 0.05) -> AurocCI:
    """AUROC with a Wald CI from DeLong's variance, computed on the AUC scale and
    clipped to [0, 1] (as pROC does; no logit transform). The variance needs at least
    two images of each class; with fewer it and the CI are nan."""
    y, (s,) = _labelled(y_true, scores)
    n_pos, n_neg = _class_counts(y)
    if n_pos == 0 or n_neg == 0:
        return AurocCI(math.nan, math.nan, math.nan, math.nan, y.size, n_pos, n_neg)
    auc, cov = _delong_cov(y, s[None, :])
    auc, var = float(auc[0]), max(float(cov[0, 0]), 0.0)   # max() keeps nan
    half = float(norm.ppf(1 - alpha / 2)) * math.sqrt(var)
    low, high = min(max(auc - half, 0.0), 1.0), min(max(auc + half, 0.0), 1.0)
    return AurocCI(auc, low, high, var, y.size, n_pos, n_neg)


def _difference_variance(d10: np.ndarray, d01: np.ndarray) -> float:
    """DeLong variance of auc_a - auc_b from the differences of the structural
    components; exactly 0 for identical rankings, whatever the class sizes."""
    if not (d10.any() or d01.any()):
        return 0.0
    return float(_cov(d10[None, :])[0, 0] / d10.size + _cov(d01[None, :])[0, 0] / d01.size)


def paired_delong(y_true, scores_a, scores_b, alpha: float = 0.05) -> PairedDeLong:
    """Paired DeLong test of auc_a - auc_b on the same images, with a Wald CI of the
    difference.

    The variance of the difference is taken from the differences of the structural
    components, not from S_aa + S_bb - 2 S_ab, so identical rankings give exactly zero
    instead of rounding noise that would turn into a spurious z. An AUC difference below
    1e-12 is a tie: delta 0, z 0, p 1 (CI 0, 0 when the rankings are identical too).
    A non-zero difference with zero variance (only in degenerate all-tied data) gives
    z = +-inf and p = 0. Fewer than two images of a class: z, p and CI are nan.
    """
    y, (sa, sb) = _labelled(y_true, scores_a, scores_b)
    n_pos, n_neg = _class_counts(y)
    if n_pos == 0 or n_neg == 0:
        nan = math.nan
        return PairedDeLong(nan, nan, nan, nan, nan, nan, nan, y.size)
    auc, v10, v01 = _structural_components(y, np.stack([sa, sb]))
    auc_a, auc_b = float(auc[0]), float(auc[1])
    var = _difference_variance(v10[0] - v10[1], v01[0] - v01[1])
    delta = auc_a - auc_b
    q = float(norm.ppf(1 - alpha / 2))
    if abs(delta) < _DELTA_TOL:
        half = 0.0 if var <= _VAR_TOL else q * math.sqrt(var)   # nan var stays nan
        return PairedDeLong(auc_a, auc_b, 0.0, 0.0 - half, half, 0.0, 1.0, y.size)
    if math.isnan(var):
        return PairedDeLong(auc_a, auc_b, delta, math.nan, math.nan, math.nan, math.nan, y.size)
    if var <= _VAR_TOL:
        return PairedDeLong(auc_a, auc_b, delta, delta, delta, math.copysign(math.inf, delta), 0.0, y.size)
    sd = math.sqrt(var)
    z = delta / sd
    p = float(min(1.0, 2.0 * norm.sf(abs(z))))
    return PairedDeLong(auc_a, auc_b, delta, delta - q * sd, delta + q * sd, z, p, y.size)


# ---------------------------------------------------------------- macro + bootstrap


def _check_matrix(Y, *Ps) -> tuple[np.ndarray, list[np.ndarray]]:
    Y = np.asarray(Y, dtype=float)
    Ps = [np.asarray(P, dtype=float) for P in Ps]
    if Y.ndim != 2:
        raise ValueError(f"Y must be [images, labels], got shape {Y.shape}")
    for P in Ps:
        if P.shape != Y.shape:
            raise ValueError(f"P has shape {P.shape} but Y has {Y.shape}")
    return Y, Ps


def macro_auroc(Y, P) -> float:
    """Mean AUROC over labels with both classes labelled (NaN in Y = unknown); nan when
    no label qualifies."""
    Y, (P,) = _check_matrix(Y, P)
    aucs = [auroc(Y[:, j], P[:, j]) for j in range(Y.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _resample_counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n images as multiplicity counts [b, n], in chunks so that
    memory stays bounded for large test sets. One rng stream: same seed, same resamples."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def _weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each row of image weights w [b, n] (bootstrap counts) for one label, with
    ties counting one half; nan where a resample lacks a class. Sorts once, then it is
    cumulative sums: O(b n)."""
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))    # last index of each tie group
    cum_pos = np.cumsum(w * y, axis=1)[:, ends]
    cum_neg = np.cumsum(w * ~y, axis=1)[:, ends]
    grp_pos = np.diff(cum_pos, axis=1, prepend=0.0)
    grp_neg = np.diff(cum_neg, axis=1, prepend=0.0)
    below = cum_neg - grp_neg                                   # negatives strictly lower
    num = (grp_pos * (below + 0.5 * grp_neg)).sum(axis=1)
    den = cum_pos[:, -1] * cum_neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _macro_weighted(Y: np.ndarray, P: np.ndarray, w: np.ndarray, labels: list[int]) -> np.ndarray:
    """Macro AUROC per resample [b]: mean over the given labels that still have both
    classes in that resample; nan if none does."""
    per_label = np.full((w.shape[0], len(labels)), np.nan)
    for k, j in enumerate(labels):
        known = ~np.isnan(Y[:, j])
        per_label[:, k] = _weighted_auroc(Y[known, j].astype(bool), P[known, j], w[:, known])
    with warnings.catch_warnings():   # 'Mean of empty slice' when no label is usable
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_label, axis=1)


def _valid_labels(Y: np.ndarray) -> list[int]:
    """Labels with both classes labelled in the full sample: the macro's label set."""
    out = []
    for j in range(Y.shape[1]):
        col = Y[:, j][~np.isnan(Y[:, j])]
        if (col == 1).any() and (col == 0).any():
            out.append(j)
    return out


def _percentile_ci(boot: np.ndarray, alpha: float) -> tuple[float, float]:
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_macro_auroc(Y, P, n_boot: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> tuple[float, float, float]:
    """Macro AUROC with a percentile bootstrap CI, resampling images (rows) so that the
    correlation between labels of one image is kept. A resample where a label lost a
    class averages over the remaining labels."""
    Y, (P,) = _check_matrix(Y, P)
    _labelled(Y.ravel(), P.ravel())   # validate labels and scores
    value = macro_auroc(Y, P)
    labels = _valid_labels(Y)
    if not labels or n_boot < 1:
        return value, math.nan, math.nan
    boot = np.concatenate([_macro_weighted(Y, P, w, labels)
                           for w in _resample_counts(Y.shape[0], n_boot, seed)])
    return (value, *_percentile_ci(boot, alpha))


def bootstrap_paired_macro_delta(Y, P_a, P_b, n_boot: int = 1000, seed: int = 0,
                                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Macro AUROC of a minus that of b, with a percentile bootstrap CI from the same
    image resamples for both, so the shared noise of the test set cancels."""
    Y, (P_a, P_b) = _check_matrix(Y, P_a, P_b)
    _labelled(Y.ravel(), P_a.ravel(), P_b.ravel())
    delta = macro_auroc(Y, P_a) - macro_auroc(Y, P_b)
    labels = _valid_labels(Y)
    if not labels or n_boot < 1:
        return delta, math.nan, math.nan
    boot = np.concatenate([
        _macro_weighted(Y, P_a, w, labels) - _macro_weighted(Y, P_b, w, labels)
        for w in _resample_counts(Y.shape[0], n_boot, seed)
    ])
    return (delta, *_percentile_ci(boot, alpha))
