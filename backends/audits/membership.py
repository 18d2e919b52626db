"""Membership-inference audit: how much a trained model reveals about who was trained on.

Pure functions (arrays in, numbers out), used by the `dp` backend after training:

- `attack_summary(scores_in, scores_out, delta)`: AUROC (DeLong CI), TPR at 1% FPR, and the
  empirical epsilon lower bound for one attack's scores (higher score = "member").
- Attacks: the loss-threshold attack (Yeom et al. 2018; score = -loss of the example) and
  LiRA-lite (Carlini et al. 2022, online, fixed variance): shadow models trained like the
  target, each on a random half of the audit pool, give per-example Gaussian fits of the
  example's logit-scaled confidence when it was in / out of training; the score is the
  likelihood ratio of the target model's confidence under the two fits.

Empirical epsilon lower bound (`epsilon_lower_bound`): an (eps, delta)-DP training algorithm
forces every membership test to satisfy TPR <= e^eps * FPR + delta and
TNR <= e^eps * FNR + delta (Kairouz et al. 2015), so
    eps >= max( log((TPR - delta) / FPR), log((TNR - delta) / FNR) ).
The bound uses Clopper-Pearson limits (one-sided 97.5% each, 95% jointly): the lower limit
of TPR (TNR) and the upper limit of FPR (FNR). The threshold and direction are chosen on a
random half of the audit examples and the bound is evaluated on the other half, so choosing
the threshold does not inflate it. Examples are treated as independent trials, as in the
usual one-training-run audit (Jagielski et al. 2020; Steinke et al. 2023 give the rigorous
version); the figure is a heuristic lower bound, not a proof. With n examples per class
(half of them evaluate the bound) it cannot exceed about log(n / 7.4), even for a model
that leaks everything (`max_certifiable_epsilon`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05   # joint level of the Clopper-Pearson limits in the epsilon bound


@dataclass(frozen=True)
class AttackSummary:
    attack: str
    auroc: float
    auroc_ci_low: float
    auroc_ci_high: float
    tpr_at_1pct_fpr: float
    eps_lower_bound: float
    eps_lower_bound_max: float    # the largest bound this many examples could certify
    n_members: int
    n_nonmembers: int

    def as_dict(self) -> dict:
        return asdict(self)


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for k successes in n trials."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _eps_from_rates(tp: int, n_in: int, fp: int, n_out: int, delta: float, alpha: float) -> float:
    """Both directions of the DP hypothesis-testing inequality with Clopper-Pearson limits."""
    tpr_low, _ = clopper_pearson(tp, n_in, alpha)
    _, fpr_high = clopper_pearson(fp, n_out, alpha)
    tnr_low, _ = clopper_pearson(n_out - fp, n_out, alpha)
    _, fnr_high = clopper_pearson(n_in - tp, n_in, alpha)
    best = 0.0
    for num, den in ((tpr_low - delta, fpr_high), (tnr_low - delta, fnr_high)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def _eps_from_rates_many(tp: np.ndarray, n_in: int, fp: np.ndarray, n_out: int, delta: float,
                         alpha: float) -> np.ndarray:
    """`_eps_from_rates` for arrays of counts at once (one vectorised beta.ppf per limit
    instead of four scalar calls per threshold): the same limits, the same bound."""
    from scipy.stats import beta

    tp, fp = np.asarray(tp, dtype=float), np.asarray(fp, dtype=float)

    def low(k, n):
        out = np.zeros_like(k)
        some = k > 0
        if n and some.any():
            out[some] = beta.ppf(alpha / 2, k[some], n - k[some] + 1)
        return out

    def high(k, n):
        out = np.ones_like(k)
        below = k < n
        if n and below.any():
            out[below] = beta.ppf(1 - alpha / 2, k[below] + 1, n - k[below])
        return out

    tpr_low, fpr_high = low(tp, n_in), high(fp, n_out)
    tnr_low, fnr_high = low(n_out - fp, n_out), high(n_in - tp, n_in)
    best = np.zeros_like(tp)
    for num, den in ((tpr_low - delta, fpr_high), (tnr_low - delta, fnr_high)):
        ok = (num > 0) & (den > 0)
        best[ok] = np.maximum(best[ok], np.log(num[ok] / den[ok]))
    return best


def _counts_above(scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray):
    """For each threshold t: members with score >= t, non-members with score >= t."""
    si, so = np.sort(scores_in), np.sort(scores_out)
    tp = len(si) - np.searchsorted(si, thresholds, side="left")
    fp = len(so) - np.searchsorted(so, thresholds, side="left")
    return tp, fp


def epsilon_lower_bound(scores_in, scores_out, delta: float, alpha: float = ALPHA,
                        seed: int = 0, max_thresholds: int = 200) -> float:
    """Empirical epsilon lower bound of one attack (see the module docstring)."""
    rng = np.random.default_rng(seed)
    si, so = np.asarray(scores_in, float), np.asarray(scores_out, float)
    pi, po = rng.permutation(len(si)), rng.permutation(len(so))
    cal_in, ev_in = si[pi[: len(si) // 2]], si[pi[len(si) // 2:]]
    cal_out, ev_out = so[po[: len(so) // 2]], so[po[len(so) // 2:]]
    if min(len(cal_in), len(cal_out), len(ev_in), len(ev_out)) == 0:
        return 0.0
    pooled = np.concatenate([cal_in, cal_out])
    q = np.unique(np.quantile(pooled, np.linspace(0, 1, max_thresholds)))
    thresholds = np.unique(np.r_[q, (q[1:] + q[:-1]) / 2])    # quantiles and the gaps between
    tp, fp = _counts_above(cal_in, cal_out, thresholds)
    cal = list(_eps_from_rates_many(tp, len(cal_in), fp, len(cal_out), delta, alpha))
    top = max(cal)
    if top <= 0:
        return 0.0
    tied = np.flatnonzero(np.asarray(cal) >= top - 1e-12)
    best = int(tied[len(tied) // 2])    # the middle of a tied range generalises best
    tp_e, fp_e = _counts_above(ev_in, ev_out, thresholds[best:best + 1])
    return _eps_from_rates(int(tp_e[0]), len(ev_in), int(fp_e[0]), len(ev_out), delta, alpha)


def max_certifiable_epsilon(n_in: int, n_out: int, delta: float, alpha: float = ALPHA) -> float:
    """The bound a perfect attack would reach with this many examples (halved for evaluation)."""
    a, b = n_in - n_in // 2, n_out - n_out // 2
    return _eps_from_rates(a, a, 0, b, delta, alpha)


def tpr_at_fpr(scores_in, scores_out, fpr: float = 0.01) -> float:
    """Largest TPR over thresholds whose FPR is at most `fpr` (ROC curve, no interpolation)."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
    f, t, _ = roc_curve(y, np.r_[scores_in, scores_out])
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def attack_summary(attack: str, scores_in, scores_out, delta: float, seed: int = 0) -> AttackSummary:
    """AUROC with DeLong CI, TPR at 1% FPR and the empirical epsilon bound of one attack."""
    from suite.metrics.auroc import delong_ci

    si, so = np.asarray(scores_in, float), np.asarray(scores_out, float)
    ci = delong_ci(np.r_[np.ones(len(si)), np.zeros(len(so))], np.r_[si, so])
    return AttackSummary(
        attack=attack, auroc=float(ci.auc), auroc_ci_low=float(ci.ci_low),
        auroc_ci_high=float(ci.ci_high), tpr_at_1pct_fpr=tpr_at_fpr(si, so, 0.01),
        eps_lower_bound=epsilon_lower_bound(si, so, delta, seed=seed),
        eps_lower_bound_max=max_certifiable_epsilon(len(si), len(so), delta),
        n_members=len(si), n_nonmembers=len(so))


# ---------------------------------------------------------------- attack statistics

def loss_scores(per_example_loss) -> np.ndarray:
    """Loss-threshold attack: a lower loss means 'member'."""
    return -np.asarray(per_example_loss, float)


def logit_confidence(logits, labels) -> np.ndarray:
    """LiRA's logit-scaled confidence for multi-label BCE: the mean over an image's known
    labels of log(p_true / (1 - p_true)), which is the logit signed by the label."""
    z, y = np.asarray(logits, float), np.asarray(labels, float)
    known = ~np.isnan(y)
    signed = np.where(known, z * (2 * np.nan_to_num(y) - 1), 0.0)
    return signed.sum(1) / np.maximum(known.sum(1), 1)


def balanced_in_mask(n_shadows: int, n_examples: int, seed: int) -> np.ndarray:
    """[K, M] membership of pool examples in shadow training sets: every example is in
    exactly half of the shadows (Carlini et al.'s balanced design)."""
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"LiRA needs an even number of shadow models >= 2, got {n_shadows}")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n_shadows, n_examples)), axis=0)
    return order < n_shadows // 2


def lira_scores(target_stat, shadow_stats, in_mask) -> np.ndarray:
    """Online LiRA with a fixed (pooled) variance: per-example means of the statistic over
    shadows that did / did not train on the example; log-likelihood ratio of the target's."""
    from scipy.stats import norm

    s = np.asarray(shadow_stats, float)
    m = np.asarray(in_mask, bool)
    t = np.asarray(target_stat, float)
    n_in, n_out = m.sum(0), (~m).sum(0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("every example needs at least one shadow with it and one without it")
    mu_in = np.where(m, s, 0).sum(0) / n_in
    mu_out = np.where(~m, s, 0).sum(0) / n_out
    sd_in = max(float(np.sqrt(np.sum(np.where(m, (s - mu_in) ** 2, 0)) / max(m.sum() - 1, 1))), 1e-6)
    sd_out = max(float(np.sqrt(np.sum(np.where(~m, (s - mu_out) ** 2, 0)) / max((~m).sum() - 1, 1))), 1e-6)
    return norm.logpdf(t, mu_in, sd_in) - norm.logpdf(t, mu_out, sd_out)
