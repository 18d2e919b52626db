"""The closed-form DP-SGD of a linear head (grad_sample_mode="linear") computes exactly what
Opacus' DPOptimizer computes on the same batch, and its accountant is Opacus' own."""

import math
import warnings

import numpy as np
import pytest
import torch

from backends.dp.linear_head import LinearHeadDPSGD, clipped_sum
from backends.dp.training import PerSampleMaskedBCE, TrainConfig, prepare, train

D, L, B = 12, 5, 40


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen) * 3          # large features: most samples get clipped
    y = (torch.rand(B, L, generator=gen) < 0.3).float()
    y[0, 1] = float("nan")                              # an unknown label, masked
    return x, y


def _opacus_grad(x, y, clip):
    """p.grad after Opacus' hooks + DPOptimizer step machinery, noise 0 (loss_reduction mean)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(D, L)
    cfg = TrainConfig(epochs=1, batch_size=B, lr=0.1, privacy="clip", max_grad_norm=clip,
                      grad_sample_mode="hooks")
    run = prepare(head, x, y, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.optimizer.zero_grad()
        run.loss_fn(run.model(x), y).backward()
        run.optimizer.pre_step()                         # clip, noise (0), scale: no Adam step
    grads = [p.grad.clone() for p in run.optimizer.params]
    run.close()
    return grads, run.expected_batch_size


def test_clipped_gradient_equals_opacus():
    x, y = _batch()
    (ow, ob), expected = _opacus_grad(x, y, clip=0.5)
    torch.manual_seed(0)
    head = torch.nn.Linear(D, L)
    step = LinearHeadDPSGD(head, torch.optim.Adam(head.parameters()), PerSampleMaskedBCE("none"),
                           0.5, 0.0, expected, 1.0, None, None)
    gw, gb, _ = step.gradients(x, y)
    assert torch.allclose(gw, ow, atol=1e-6) and torch.allclose(gb, ob, atol=1e-6)


def test_unclipped_variant_is_caught():
    """Positive control: the per-sample clipping is what makes the two agree; skipping it
    (an infinite clip norm) gives a different gradient on this batch."""
    x, y = _batch()
    (ow, _), expected = _opacus_grad(x, y, clip=0.5)
    torch.manual_seed(0)
    head = torch.nn.Linear(D, L)
    gw, _, _ = clipped_sum(head, x, lambda z: PerSampleMaskedBCE("none")(z, y), math.inf)
    assert not torch.allclose(gw / expected, ow, atol=1e-3)


def test_per_sample_norms_are_bounded():
    x, y = _batch(1)
    head = torch.nn.Linear(D, L)
    for i in range(B):   # each image's clipped contribution alone has norm <= C
        gw, gb, _ = clipped_sum(head, x[i:i + 1], lambda z: PerSampleMaskedBCE("none")(z, y[i:i + 1]), 0.3)
        assert math.sqrt(float(gw.pow(2).sum() + gb.pow(2).sum())) <= 0.3 + 1e-5


def test_training_run_accounts_like_opacus():
    """The same steps and noise under the closed form and Opacus hooks give the same epsilon."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, D, generator=gen)
    y = (torch.rand(200, L, generator=gen) < 0.3).float()
    eps = {}
    for mode in ("linear", "hooks"):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=50, lr=0.05, privacy="dp", noise_multiplier=1.1,
                          grad_sample_mode=mode, seed=3, noise_seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = train(torch.nn.Linear(D, L), x, y, cfg)
        eps[mode] = (r.epsilon, r.steps)
        assert np.isfinite(r.losses).all()
    assert eps["linear"][1] == eps["hooks"][1] == 8
    assert eps["linear"][0] == pytest.approx(eps["hooks"][0], rel=1e-9)


def test_linear_mode_needs_a_linear_head():
    with pytest.raises(ValueError, match="nn.Linear"):
        LinearHeadDPSGD(torch.nn.Sequential(torch.nn.Linear(D, L)), None, None, 1.0, 1.0, 1, 1.0,
                        None, None)
