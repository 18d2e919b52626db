"""backends.mpc.ring: int64 products on float64 kernels must equal torch's int64 ones bit for bit."""

from __future__ import annotations

import pytest
import torch

from backends.mpc import ring

FULL = (-(2 ** 63), 2 ** 63 - 1)
#: balanced 22-bit digits (-2^21, -2^21, 0): every limb product is 2^42, the largest there is
WORST = -(2 ** 21) - 2 ** 43


def _random(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*FULL, shape, generator=g)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 8, 9, 9), (5, 8, 3, 3), 1, 1),
    ((1, 3, 11, 11), (4, 3, 7, 7), 2, 3),
    ((2, 16, 4, 4), (6, 16, 1, 1), 1, 0),
])
def test_conv2d_matches_int64_kernel_on_the_whole_ring(shape, kernel, stride, padding):
    x, w = _random(*shape, seed=1), _random(*kernel, seed=2)
    want = torch.conv2d(x, w, stride=stride, padding=padding)
    assert torch.equal(ring.ring_conv2d(x, w, stride=stride, padding=padding), want)


def test_matmul_matches_int64_kernel():
    x, w = _random(3, 40, seed=3), _random(40, 7, seed=4)
    assert torch.equal(ring.ring_matmul(x, w), x @ w)
    xb = _random(2, 3, 40, seed=5)
    assert torch.equal(ring.ring_matmul(xb, w), torch.matmul(xb, w))


@pytest.mark.parametrize("k", [2048, 4096])
def test_worst_case_digits_at_the_longest_contraction_of_each_limb_count(k):
    """At K = 2048 three limbs sum exactly 2^53; one more doubling needs four limbs."""
    assert ring.limb_plan(k)[0] == (3 if k == 2048 else 4)
    x = torch.full((1, k, 2, 2), WORST)
    w = torch.full((2, k, 1, 1), WORST)
    assert torch.equal(ring.ring_conv2d(x, w), torch.conv2d(x, w))


def test_positive_control_three_limbs_past_their_bound_are_caught(monkeypatch):
    """The check has teeth: forcing 3 limbs on K = 4096 (sums up to 2^54) breaks exactness."""
    three = ring.limb_plan(2048)
    monkeypatch.setattr(ring, "limb_plan", lambda k: three)
    odd = (1 - 2 ** 21) * (1 + 2 ** 22)           # digits 1 - 2^21, 1 - 2^21: odd products near 2^42
    x = torch.full((1, 4096, 1, 1), odd)
    assert not torch.equal(ring.ring_conv2d(x, x), torch.conv2d(x, x))


def test_other_inputs_go_to_torch_unchanged():
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    assert torch.equal(ring.ring_conv2d(x, w, padding=1), torch.conv2d(x, w, padding=1))
    xi, wi = _random(1, 4, 5, 5), _random(4, 2, 3, 3)
    assert torch.equal(ring.ring_conv2d(xi, wi, groups=2), torch.conv2d(xi, wi, groups=2))


def test_import_crypten_routes_every_product_module_through_the_ring():
    import sys

    from backends.mpc.crypten_compat import import_crypten

    import_crypten()
    for name in ring.PRODUCT_MODULES:
        proxy = sys.modules[name].torch
        assert proxy.conv2d is ring.ring_conv2d and proxy.matmul is ring.ring_matmul, name
        assert proxy.Size is torch.Size          # everything else is torch's own


@pytest.mark.parametrize("bound,products", [(2 ** 20, 3), (2 ** 30, 5), (2 ** 42, 5), (2 ** 62, 6)])
def test_small_weights_skip_empty_limbs_and_stay_exact(bound, products, monkeypatch):
    """A plain fixed-point weight (|w| < 2^43) has empty top limbs: fewer products, same result."""
    g = torch.Generator().manual_seed(7)
    x = _random(2, 8, 6, 6, seed=8)
    w = torch.randint(-bound, bound, (4, 8, 3, 3), generator=g)
    w[0, 0, 0, 0] = -bound
    calls = []
    real = torch.conv2d
    monkeypatch.setattr(torch, "conv2d", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    got = ring.ring_conv2d(x, w, padding=1)
    monkeypatch.undo()
    assert torch.equal(got, torch.conv2d(x, w, padding=1))
    assert sum(calls) == products * w.shape[0]     # limb products actually computed
