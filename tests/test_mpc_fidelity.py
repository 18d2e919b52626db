"""Fixed-point fidelity of the CrypTen path on a model with huge activations (random BatchNorm).

A random DenseNet-121 at 224 px missed the 1e-3 bar (max |dp| 1.3e-3): its activations reach
~1e5, so the precision the ring allows (19 bits) is too coarse for its weights. A small DenseNet
whose BatchNorm scales are raised by 1.3 reproduces that in seconds at 32 px: without
rescaling, its automatic precision moves the logits by ~1e-2 (|dp| up to a quarter of it) and
the model owner refuses; with the per-channel rescaling (`mpc_plan.balance_channels`) it gets
24 bits and a real two-party run stays within the bar.
"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest
import torch

from backends.mpc.plan import (
    FIDELITY_BAR, TorchOps, balance_channels, build_plan, calibrate, choose_precision,
    model_owner_fixed_point, plan_from_dict, plan_to_dict, predicted_logit_error, public_calibration_images,
    run_plan,
)
from suite.models import SMALL_DENSENET, build_densenet

SIZE = 32
LABELS = ["a", "b", "c"]


def _loud_densenet(gain: float = 1.3):
    """The small DenseNet with untrained BatchNorm whose scales are multiplied by `gain`:
    activations grow layer after layer, as in a random DenseNet-121 (largest product ~2e4)."""
    torch.manual_seed(0)
    net = build_densenet(SMALL_DENSENET, len(LABELS))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data *= gain
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return public_calibration_images(SIZE, n_per_site=1)


@pytest.mark.parametrize("pre_mode", ["split", "mul"])
def test_channel_rescaling_keeps_the_logits_and_shrinks_the_largest_product(pre_mode, images):
    plan, params = build_plan(_loud_densenet(), pre_mode)
    balanced, scaled = balance_channels(plan, params, images)
    x = images.double() * plan.input_scale
    with torch.no_grad():
        before = run_plan(plan, params, x, TorchOps())
        after = run_plan(balanced, scaled, x, TorchOps())
    # powers of two only: the float64 network is the same up to summation order
    assert (after - before).abs().max().item() <= 1e-12 * before.abs().max().item()
    assert balanced.output_scale > 1 and plan.output_scale == 1
    # the data owner's copy of the plan carries the output scale
    assert plan_from_dict(plan_to_dict(balanced)).output_scale == balanced.output_scale
    cal, cal_balanced = calibrate(plan, params, images), calibrate(balanced, scaled, images)
    assert cal.max_abs_product > 1e3 * cal_balanced.max_abs_product
    assert choose_precision(0, "exact", cal_balanced) > choose_precision(0, "exact", cal) + 2


def test_fixed_point_emulation_predicts_more_error_with_fewer_bits(images):
    plan, params = build_plan(_loud_densenet())
    errors = [predicted_logit_error(plan, params, images[:2], bits) for bits in (14, 18, 22)]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0


def test_model_owner_refuses_what_fixed_point_cannot_serve_and_rescaling_fixes_it():
    plan, params = build_plan(_loud_densenet())
    with pytest.raises(ValueError, match=r"cannot be run within max \|dp\| <= 0.001 .*use scaling=channels"):
        model_owner_fixed_point(plan, params, SIZE, 0, "exact", "none")
    # an explicit precision runs anyway (the row then shows the predicted error)
    _, _, cal, bits = model_owner_fixed_point(plan, params, SIZE, 20, "exact", "none")
    assert bits == 20 and cal.logit_error / 4 > FIDELITY_BAR
    balanced, _, cal, bits = model_owner_fixed_point(plan, params, SIZE, 0, "exact", "channels")
    assert bits == 24 and cal.logit_error / 4 <= FIDELITY_BAR
    # a model whose logits are too large for any precision is refused either way
    plan, params = build_plan(_loud_densenet(gain=2.0))
    with pytest.raises(ValueError, match="cannot be run within"):
        model_owner_fixed_point(plan, params, SIZE, 0, "exact", "channels")


@pytest.mark.skipif(find_spec("crypten") is None, reason="needs the [mpc] extra")
def test_two_party_run_of_the_loud_model_meets_the_bar_and_the_refusal_is_one_line(tmp_path, images):
    from backends.mpc import MPCBackend, MPCOptions
    from suite.backend import BackendContext
    from suite.errors import SuiteError
    from suite.meter import CommMeter
    from suite.models import ModelBundle

    bundle = ModelBundle(net=_loud_densenet(), name="loud-small-densenet", architecture=SMALL_DENSENET,
                         pathologies=LABELS, resolution=SIZE, source="test")

    def backend(**options):
        b = MPCBackend(MPCOptions(**{"timeout_s": 120, "triples": "tfp", "batch_size": 2, **options}))
        return b, BackendContext(model=bundle, meter=CommMeter(), workdir=tmp_path, threads=2)

    refused, ctx = backend(scaling="none")
    with pytest.raises(SuiteError, match="cannot be run within") as exc:
        refused.setup(ctx)
    refused.teardown()
    assert "\n" not in str(exc.value)

    mpc, ctx = backend()
    x = (images[:2].numpy() * 0.5).astype(np.float32)      # not the calibration images themselves
    try:
        mpc.setup(ctx)
        ctx.meter.set_phase("online")
        probs = mpc.predict_proba(x)
    finally:
        mpc.teardown()
    with torch.no_grad():
        ref = bundle.logits(torch.from_numpy(x)).double()
    assert (mpc.last_logits.double() - ref).abs().max().item() / 4 <= FIDELITY_BAR
    assert np.abs(probs - torch.sigmoid(ref).numpy()).max() <= FIDELITY_BAR
    rows = {r["metric"]: r for r in mpc.extra_rows()}
    assert rows["fixed_point_precision_bits"]["value"] == 24
    assert rows["fixed_point_logit_error"]["estimate"] == "simulated"
