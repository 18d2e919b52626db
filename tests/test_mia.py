"""Membership-inference audit: the statistics, and that they separate leaky from private models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.audits import membership as mia


def test_clopper_pearson_known_values():
    low, high = mia.clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = mia.clopper_pearson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10))
    low, high = mia.clopper_pearson(5, 10)
    assert low < 0.5 < high


def test_epsilon_bound_is_zero_without_signal_and_capped_with_perfect_signal(rng):
    same_in, same_out = rng.normal(size=400), rng.normal(size=400)
    assert mia.epsilon_lower_bound(same_in, same_out, delta=1e-3) < 0.3
    perfect = mia.epsilon_lower_bound(2 + rng.random(400), rng.random(400), delta=1e-3)
    cap = mia.max_certifiable_epsilon(400, 400, delta=1e-3)
    assert perfect == pytest.approx(cap)
    assert cap == pytest.approx(math.log((0.025 ** (1 / 200) - 1e-3) / (1 - 0.025 ** (1 / 200))))


def test_tpr_at_low_fpr(rng):
    assert mia.tpr_at_fpr(np.full(50, 2.0), np.zeros(50)) == 1.0
    assert mia.tpr_at_fpr(np.zeros(50), np.full(50, 2.0)) == 0.0


def test_attack_summary_fields(rng):
    s = mia.attack_summary("loss_threshold", rng.normal(1, 1, 200), rng.normal(0, 1, 200), 1e-3)
    assert 0.7 < s.auroc < 0.85 and s.auroc_ci_low < s.auroc < s.auroc_ci_high
    assert 0 <= s.tpr_at_1pct_fpr <= 1 and 0 <= s.eps_lower_bound <= s.eps_lower_bound_max
    assert (s.n_members, s.n_nonmembers) == (200, 200)


def test_balanced_in_mask():
    m = mia.balanced_in_mask(8, 30, seed=1)
    assert m.shape == (8, 30) and (m.sum(0) == 4).all()
    with pytest.raises(ValueError):
        mia.balanced_in_mask(3, 10, seed=0)


def test_lira_scores_rank_members_first(rng):
    k, n = 8, 200
    mask = mia.balanced_in_mask(k, n, seed=2)
    difficulty = rng.normal(0, 2, n)                       # per-example offsets LiRA calibrates away
    shadows = difficulty + np.where(mask, 1.0, 0.0) + rng.normal(0, 0.3, (k, n))
    member = rng.random(n) < 0.5
    target = difficulty + np.where(member, 1.0, 0.0) + rng.normal(0, 0.3, n)
    scores = mia.lira_scores(target, shadows, mask)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(member, scores) > 0.9
    assert roc_auc_score(member, target) < roc_auc_score(member, scores)  # calibration helps


def test_logit_confidence_signs_and_masks():
    z = np.array([[2.0, -1.0], [2.0, 0.0]])
    y = np.array([[1.0, 0.0], [0.0, np.nan]])
    assert mia.logit_confidence(z, y).tolist() == [1.5, -2.0]


def test_overfit_model_leaks_and_private_model_does_not():
    """A head that memorises random labels is caught by the loss attack; DP-SGD at eps=1 is not."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    from backends.dp.training import (TrainConfig, noise_for_epsilon, per_sample_loss,
                                      steps_and_rate, train)

    g = torch.Generator().manual_seed(0)
    n, d, delta = 50, 300, 1e-3
    x = torch.randn(2 * n, d, generator=g)
    y = (torch.rand(2 * n, 5, generator=g) < 0.5).float()
    aurocs = {}
    for privacy, eps in (("none", None), ("dp", 1.0)):
        steps, q = steps_and_rate(n, 10, 60)
        sigma = noise_for_epsilon(eps, delta, q, steps) if eps else 0.0
        torch.manual_seed(0)
        head = torch.nn.Linear(d, 5)
        train(head, x[:n], y[:n], TrainConfig(epochs=60, batch_size=10, lr=0.05, privacy=privacy,
                                              noise_multiplier=sigma, delta=delta))
        with torch.no_grad():
            loss = per_sample_loss(head(x), y).numpy()
        s = mia.attack_summary("loss_threshold", mia.loss_scores(loss[:n]),
                               mia.loss_scores(loss[n:]), delta)
        aurocs[privacy] = s.auroc
        if privacy == "none":
            assert s.eps_lower_bound > 1.0      # the audit certifies real leakage
    assert aurocs["none"] > 0.9
    assert abs(aurocs["dp"] - 0.5) < 0.15


def test_vectorised_epsilon_limits_equal_the_scalar_ones():
    """The audit's threshold sweep uses the vectorised Clopper-Pearson bound: it must equal
    the scalar one on every count, edge counts (0 and n) included."""
    import numpy as np

    from backends.audits.membership import _eps_from_rates, _eps_from_rates_many

    n_in, n_out = 12, 9
    tp, fp = np.meshgrid(np.arange(n_in + 1), np.arange(n_out + 1))
    many = _eps_from_rates_many(tp.ravel(), n_in, fp.ravel(), n_out, 1e-3, 0.05)
    one = [_eps_from_rates(int(a), n_in, int(b), n_out, 1e-3, 0.05) for a, b in zip(tp.ravel(), fp.ravel())]
    assert np.allclose(many, one, rtol=0, atol=1e-12)
    assert max(one) > 0        # the grid reaches counts with a positive bound
