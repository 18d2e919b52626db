"""AUROC, DeLong and bootstrap: checked against sklearn and a brute-force DeLong (1988)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from suite.metrics.auroc import (
    AurocCI,
    PairedDeLong,
    _macro_weighted,
    _resample_counts,
    _valid_labels,
    auroc,
    bootstrap_macro_auroc,
    bootstrap_paired_macro_delta,
    delong_ci,
    macro_auroc,
    paired_delong,
)

Z975 = 1.959963984540054


# ---------------------------------------------------------------- brute-force DeLong


def psi(x: float, y: float) -> float:
    """Heaviside kernel of DeLong et al. (1988)."""
    if x > y:
        return 1.0
    if x == y:
        return 0.5
    return 0.0


def brute_delong(y, score_rows):
    """AUCs and covariance S = S10/m + S01/n by the definitions, with explicit loops.

    V10_r(X_i) = 1/n sum_j psi(X_ri, Y_rj)   (one per positive)
    V01_r(Y_j) = 1/m sum_i psi(X_ri, Y_rj)   (one per negative)
    S10[r,s] = 1/(m-1) sum_i (V10_r(X_i) - A_r)(V10_s(X_i) - A_s), S01 likewise.
    """
    y = list(y)
    pos = [i for i, t in enumerate(y) if t == 1]
    neg = [j for j, t in enumerate(y) if t == 0]
    m, n, k = len(pos), len(neg), len(score_rows)
    v10 = [[0.0] * m for _ in range(k)]
    v01 = [[0.0] * n for _ in range(k)]
    auc = [0.0] * k
    for r, s in enumerate(score_rows):
        total = 0.0
        for a, i in enumerate(pos):
            for b, j in enumerate(neg):
                h = psi(s[i], s[j])
                v10[r][a] += h / n
                v01[r][b] += h / m
                total += h
        auc[r] = total / (m * n)
    s10 = [[0.0] * k for _ in range(k)]
    s01 = [[0.0] * k for _ in range(k)]
    for r in range(k):
        for q in range(k):
            s10[r][q] = sum((v10[r][a] - auc[r]) * (v10[q][a] - auc[q]) for a in range(m)) / (m - 1)
            s01[r][q] = sum((v01[r][b] - auc[r]) * (v01[q][b] - auc[q]) for b in range(n)) / (n - 1)
    cov = [[s10[r][q] / m + s01[r][q] / n for q in range(k)] for r in range(k)]
    return auc, cov


def brute_paired(y, a, b):
    (auc_a, auc_b), cov = brute_delong(y, [a, b])
    var = cov[0][0] + cov[1][1] - 2 * cov[0][1]
    z = (auc_a - auc_b) / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2))
    return auc_a, auc_b, var, z, p


def _dataset(seed, n, prevalence, ties):
    """Correlated scores of two models; `ties` rounds scores so that ties are common."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2], y[2:4] = 1, 0                     # at least two of each class
    latent = y * 1.0 + rng.normal(size=n)
    a = latent + 0.5 * rng.normal(size=n)
    b = 0.6 * latent + 0.8 * rng.normal(size=n)
    if ties:
        a, b = np.round(a, 0), np.round(b, 0)
    return y, a, b


DATASETS = [
    dict(seed=1, n=60, prevalence=0.5, ties=False),
    dict(seed=2, n=80, prevalence=0.5, ties=True),
    dict(seed=3, n=90, prevalence=0.1, ties=False),     # unbalanced
    dict(seed=4, n=70, prevalence=0.85, ties=True),     # unbalanced the other way, ties
    dict(seed=5, n=7, prevalence=0.5, ties=False),      # small n
    dict(seed=6, n=5, prevalence=0.5, ties=True),       # tiny n, ties
]


@pytest.mark.parametrize("cfg", DATASETS, ids=lambda c: f"seed{c['seed']}")
def test_delong_matches_brute_force(cfg):
    y, a, b = _dataset(**cfg)
    auc, cov = brute_delong(y, [a])
    ci = delong_ci(y, a)
    assert ci.auc == pytest.approx(auc[0], abs=1e-12)
    assert ci.variance == pytest.approx(cov[0][0], abs=1e-10, rel=1e-10)
    half = Z975 * math.sqrt(cov[0][0])
    assert ci.ci_low == pytest.approx(max(0.0, auc[0] - half), abs=1e-10)
    assert ci.ci_high == pytest.approx(min(1.0, auc[0] + half), abs=1e-10)
    assert (ci.n, ci.n_pos, ci.n_neg) == (len(y), int(y.sum()), int((1 - y).sum()))


@pytest.mark.parametrize("cfg", DATASETS, ids=lambda c: f"seed{c['seed']}")
def test_paired_delong_matches_brute_force(cfg):
    y, a, b = _dataset(**cfg)
    auc_a, auc_b, var, z, p = brute_paired(y, a, b)
    res = paired_delong(y, a, b)
    assert res.auc_a == pytest.approx(auc_a, abs=1e-12)
    assert res.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert res.delta == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert res.z == pytest.approx(z, abs=1e-10, rel=1e-10)
    assert res.p_value == pytest.approx(p, abs=1e-10)
    half = Z975 * math.sqrt(var)
    assert res.ci_low == pytest.approx(res.delta - half, abs=1e-10)
    assert res.ci_high == pytest.approx(res.delta + half, abs=1e-10)
    assert res.n == len(y)


# ---------------------------------------------------------------- point estimate


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)          # about 14 distinct values: many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_drops_nan_labels_and_needs_both_classes():
    y = np.array([1, 0, np.nan, 1, 0])
    s = np.array([0.9, 0.1, 0.0, 0.4, 0.5])
    assert auroc(y, s) == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]))
    assert math.isnan(auroc([1, 1, np.nan], [0.1, 0.2, 0.3]))
    ci = delong_ci([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(ci.auc) and math.isnan(ci.ci_low) and ci.n_neg == 3


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, np.nan])


def test_perfect_classifier_ci_is_clipped():
    ci = delong_ci([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert ci == AurocCI(1.0, 1.0, 1.0, 0.0, 6, 3, 3)


def test_one_positive_gives_nan_variance():
    ci = delong_ci([1, 0, 0, 0], [0.9, 0.1, 0.5, 0.2])
    assert ci.auc == 1.0 and math.isnan(ci.variance) and math.isnan(ci.ci_low)


# ---------------------------------------------------------------- DeLong behaviour


def test_delong_variance_close_to_bootstrap():
    rng = np.random.default_rng(7)
    n_pos, n_neg = 150, 250
    pos, neg = rng.normal(1.0, 1, n_pos), rng.normal(0.0, 1, n_neg)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    ci = delong_ci(y, np.r_[pos, neg])
    boot = []
    for _ in range(2000):      # stratified, as DeLong conditions on the class counts
        bp, bn = rng.choice(pos, n_pos), rng.choice(neg, n_neg)
        boot.append(auroc(y, np.r_[bp, bn]))
    assert ci.variance == pytest.approx(np.var(boot, ddof=1), rel=0.3)


def test_delong_ci_coverage():
    rng = np.random.default_rng(11)
    d, n = 1.2, 100
    true_auc = float(0.5 * math.erfc(-d / 2))          # Phi(d / sqrt 2)
    y = np.r_[np.ones(n), np.zeros(n)]
    hits = 0
    for _ in range(200):
        s = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
        ci = delong_ci(y, s)
        hits += ci.ci_low <= true_auc <= ci.ci_high
    assert 0.90 <= hits / 200 <= 0.99


def test_paired_identical_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    s = rng.random(100)
    res = paired_delong(y, s, s.copy())
    assert res == PairedDeLong(res.auc_a, res.auc_a, 0.0, 0.0, 0.0, 0.0, 1.0, 100)
    # same ranking through a monotone transform is identical too
    assert paired_delong(y, s, s ** 3).p_value == 1.0


def test_paired_clearly_different_models():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    latent = rng.normal(size=n)
    a = 2.0 * y + latent
    b = 0.5 * y + latent + rng.normal(size=n)
    res = paired_delong(y, a, b)
    assert res.delta > 0 and res.p_value < 0.01 and res.ci_low > 0


def _tiny_noise_case(seed, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = 1 / (1 + np.exp(-(y + rng.normal(size=n))))
    return rng, y, a


def test_paired_tiny_noise_is_not_significant():
    rng, y, a = _tiny_noise_case(2)
    res = paired_delong(y, a, a + 1e-6 * rng.normal(size=a.size))
    assert all(np.isfinite([res.delta, res.z, res.p_value, res.ci_low, res.ci_high]))
    assert res.p_value > 0.05 and abs(res.delta) < 1e-4


def test_paired_tiny_noise_breaking_one_tie():
    # noise reorders one tied positive/negative pair: delta = 1/(2 m n), a real but tiny
    # difference whose DeLong z is 1/sqrt(2) whatever m and n: p about 0.48, not tiny
    rng, y, a = _tiny_noise_case(3)
    i, j = np.flatnonzero(y == 1)[0], np.flatnonzero(y == 0)[0]
    a[j] = a[i]
    b = a.copy()
    b[i] += 1e-6
    res = paired_delong(y, a, b)
    m, n = int(y.sum()), int((1 - y).sum())
    assert res.delta == pytest.approx(-0.5 / (m * n), rel=1e-9)
    assert res.z == pytest.approx(-1 / math.sqrt(2), rel=1e-6)
    assert res.p_value == pytest.approx(0.4795, abs=1e-3)


def test_paired_tiny_noise_heavy_ties_stays_finite():
    # rounding makes many ties; noise breaks them at random, so p is a fair coin-ish
    # draw (DeLong is right to see a difference of a few 1e-4): only check it is sane
    rng, y, a = _tiny_noise_case(4)
    a = np.round(a, 2)
    res = paired_delong(y, a, a + 1e-6 * rng.normal(size=a.size))
    assert all(np.isfinite([res.delta, res.z, res.p_value, res.ci_low, res.ci_high]))
    assert 0.0 < res.p_value <= 1.0 and abs(res.delta) < 1e-3


def test_paired_equal_auc_different_rankings_keeps_ci():
    # swapping the scores of two positives changes the ranking but not the AUC
    y = np.array([1, 1, 0, 0, 1, 0])
    a = np.array([0.9, 0.4, 0.3, 0.5, 0.8, 0.1])
    b = np.array([0.4, 0.9, 0.3, 0.5, 0.8, 0.1])
    res = paired_delong(y, a, b)
    assert res.delta == 0.0 and res.p_value == 1.0 and res.z == 0.0
    assert res.ci_low == -res.ci_high and res.ci_high > 0


def test_paired_degenerate_zero_variance_is_finite_p():
    y = np.array([0, 0, 1, 1])
    res = paired_delong(y, [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert res.delta == 0.5 and res.p_value == 0.0 and res.ci_low == res.ci_high == 0.5


# ---------------------------------------------------------------- macro + bootstrap


def _multilabel(seed, n=700, n_labels=5):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, n_labels)) < [0.3, 0.1, 0.5, 0.05, 0.2]).astype(float)
    P = 1 / (1 + np.exp(-(1.5 * Y + rng.normal(size=Y.shape))))
    P = np.round(P, 2)                                   # ties
    Y[rng.random(Y.shape) < 0.15] = np.nan               # unknown labels
    return Y, P


def test_macro_auroc_is_mean_of_label_aurocs():
    Y, P = _multilabel(0)
    Y[:, 1] = np.where(np.isnan(Y[:, 1]), np.nan, 0.0)   # label with one class: skipped
    expected = np.mean([auroc(Y[:, j], P[:, j]) for j in (0, 2, 3, 4)])
    assert macro_auroc(Y, P) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(macro_auroc(np.zeros((4, 2)), np.zeros((4, 2))))


def test_weighted_bootstrap_auroc_equals_auroc_of_resampled_rows():
    Y, P = _multilabel(1, n=120)
    labels = _valid_labels(Y)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 120, size=(20, 120))
    counts = np.stack([np.bincount(i, minlength=120) for i in idx]).astype(float)
    fast = _macro_weighted(Y, P, counts, labels)
    for b in range(20):
        Yb, Pb = Y[idx[b]], P[idx[b]]
        aucs = [auroc(Yb[:, j], Pb[:, j]) for j in labels]
        assert fast[b] == pytest.approx(np.nanmean(aucs), abs=1e-12)


def test_resample_counts_chunks_sum_to_n(monkeypatch):
    import suite.metrics.auroc as mod
    monkeypatch.setattr(mod, "_BOOT_CHUNK_ELEMENTS", 50)
    chunks = list(_resample_counts(10, 23, seed=0))
    counts = np.concatenate(chunks)
    assert counts.shape == (23, 10) and len(chunks) == 5
    assert (counts.sum(axis=1) == 10).all()


def test_bootstrap_macro_auroc_brackets_value():
    # Its speed is tracked in benchmarks/, not asserted here.
    Y, P = _multilabel(2)
    value, low, high = bootstrap_macro_auroc(Y, P, n_boot=1000, seed=0)
    assert value == pytest.approx(macro_auroc(Y, P))
    assert low < value < high and high - low < 0.1
    assert bootstrap_macro_auroc(Y, P, n_boot=200, seed=5) == bootstrap_macro_auroc(Y, P, n_boot=200, seed=5)


def test_bootstrap_paired_delta():
    Y, P = _multilabel(3)
    rng = np.random.default_rng(4)
    worse = np.clip(P + 0.3 * rng.normal(size=P.shape), 0, 1)
    delta, low, high = bootstrap_paired_macro_delta(Y, P, worse, n_boot=500, seed=0)
    assert delta == pytest.approx(macro_auroc(Y, P) - macro_auroc(Y, worse))
    assert 0 < low < delta < high
    assert bootstrap_paired_macro_delta(Y, P, P.copy(), n_boot=200) == (0.0, 0.0, 0.0)
