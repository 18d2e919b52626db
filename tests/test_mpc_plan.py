"""BatchNorm folding and the secure-friendly rewrite are exact, in plaintext.

`backends.mpc.plan.run_plan` is the code path that runs under MPC; here it runs on float64
torch tensors and must reproduce the original DenseNet to 1e-5 (it does to ~1e-12).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.mpc.plan import (
    TorchOps, build_plan, max_pool_separable, plaintext_logits, plan_from_dict, plan_to_dict, run_plan,
)
from suite.models import SMALL_DENSENET, build_densenet

TINY = dict(growth_rate=4, block_config=(1, 2), num_init_features=8, bn_size=2)


def _hard_bn_net(arch, seed=0):
    """A DenseNet whose BatchNorms have calibrated statistics and random signs, including
    exactly-zero and negative scales (the cases the folding must get right)."""
    torch.manual_seed(seed)
    net = build_densenet(arch, 3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.randn_like(m.weight)
            m.weight.data[0] = 0.0
            m.bias.data = torch.randn_like(m.bias) * 0.5
            m.momentum = None
    net.train()
    with torch.no_grad():
        net.features2(torch.rand(8, 1, 32, 32) * 2048 - 1024)
    return net.eval().double()


@pytest.mark.parametrize("pre_mode", ["split", "mul"])
@pytest.mark.parametrize("arch,size", [(TINY, 32), (TINY, 35), (SMALL_DENSENET, 64)])
def test_folded_plan_equals_the_model(pre_mode, arch, size):
    net = _hard_bn_net(arch)
    x = torch.rand(3, 1, size, size, dtype=torch.float64) * 2048 - 1024
    with torch.no_grad():
        ref = net.classifier(net.features2(x))
    out = plaintext_logits(net, x, pre_mode)
    assert (out - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 1e-2          # not trivially zero


def test_float32_model_folds_within_1e_5():
    """The model as the suite holds it (float32) vs the folded float64 plan."""
    net = _hard_bn_net(TINY).float()
    x = torch.rand(2, 1, 32, 32) * 2048 - 1024
    with torch.no_grad():
        ref = net.classifier(net.features2(x)).double()
    assert (plaintext_logits(net, x) - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


def test_no_secure_multiplication_is_left_in_split_mode():
    """split mode: pre-activation BN needs no parameters besides a shared shift."""
    plan, params = build_plan(_hard_bn_net(TINY), "split")
    pres = [layer.pre for block in plan.blocks for layer in block] + [t.pre for t in plan.transitions]
    assert all(p.mode == "split" and p.s is None for p in pres + [plan.final])
    assert not [k for k in params if k.endswith(".s")]
    # norm0 and norm2 are gone (folded into conv0 / conv1), as are the pooling divisors
    assert not [k for k in params if "norm0" in k or "norm2" in k]


@pytest.mark.parametrize("size,k,s,p", [(32, 3, 2, 1), (33, 3, 2, 1), (16, 2, 2, 0), (15, 3, 1, 1)])
def test_separable_max_pool_matches_torch(size, k, s, p):
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
    ref = F.max_pool2d(x, k, s, p)
    assert torch.equal(max_pool_separable(x, k, s, p, TorchOps()), ref)


def test_skeleton_carries_shapes_but_no_weights():
    net = _hard_bn_net(TINY)
    plan, params = build_plan(net)
    d = plan_to_dict(plan)

    def leaves(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from leaves(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from leaves(v)
        else:
            yield obj

    assert not any(isinstance(v, torch.Tensor) or (isinstance(v, float) and v not in (plan.input_scale,))
                   for v in leaves(d))
    again = plan_from_dict(d)
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    assert torch.equal(run_plan(again, params, x, TorchOps()), run_plan(plan, params, x, TorchOps()))


def test_calibration_chooses_precision_from_the_activation_range():
    """A model with calibrated BatchNorm has small products and gets the most bits; the same
    architecture with random BN statistics (products in the thousands) gets fewer, and a
    precision that would overflow the ring on calibration images is refused."""
    from backends.mpc.plan import (
        MAX_AUTO_PRECISION, RANGE_HEADROOM_BITS, calibrate, choose_precision, public_calibration_images,
    )

    images = public_calibration_images(64, n_per_site=1)
    calibrated = _hard_bn_net(SMALL_DENSENET)
    torch.manual_seed(0)
    raw = build_densenet(SMALL_DENSENET, 3).eval()
    cal_ok = calibrate(*build_plan(calibrated), images)
    cal_raw = calibrate(*build_plan(raw), images)
    assert cal_raw.max_abs_product > 10 * cal_ok.max_abs_product
    bits_raw = choose_precision(0, "exact", cal_raw)
    assert bits_raw < choose_precision(0, "exact", cal_ok) <= MAX_AUTO_PRECISION
    assert cal_raw.headroom_bits(bits_raw) >= RANGE_HEADROOM_BITS > cal_raw.headroom_bits(bits_raw + 1)
    # local truncation keeps CrypTen's 16 bits and says how often it is expected to fail
    assert choose_precision(0, "local", cal_raw) == 16
    assert cal_raw.local_failures_per_image(16) > 100 * cal_ok.local_failures_per_image(16)
    with pytest.raises(ValueError, match="overflows"):
        choose_precision(30, "exact", cal_raw)
