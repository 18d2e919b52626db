"""The dp backend: sweep expansion, controls that really differ, clipping, the privacy unit,
CSPRNG noise, the audit phase, and a tiny run."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from backends.dp.backend import DPBackend, DPOptions, audit_split  # noqa: E402
from backends.dp.training import (PerSampleMaskedBCE, TrainConfig, make_opacus_compatible,  # noqa: E402
                                  prepare, train)
from suite.backend import BackendContext  # noqa: E402
from suite.errors import SuiteError  # noqa: E402
from suite.meter import CommMeter  # noqa: E402

# ------------------------------------------------------------------ configurations


def test_default_entry_expands_into_sweep_and_two_controls():
    configs = DPBackend.expand(DPOptions())
    labels = [c.config_label() for c in configs]
    assert labels == ["dp[target_epsilon=1.0]", "dp[target_epsilon=3.0]", "dp[target_epsilon=8.0]",
                      "dp[target_epsilon=inf]", "dp[noise=False]"]
    regimes = [c.regime for c in configs]
    assert regimes == ["dp", "dp", "dp", "none", "clip"]
    for c in configs:
        ref = c.reference()
        if c.regime == "none":
            assert ref is None        # the control is the comparison; no max|dp| vs another model
        else:
            assert isinstance(ref, DPBackend) and ref.config_label() == "dp[target_epsilon=inf]"
    kinds = [c.threat_model().guarantee_kind for c in configs]
    assert kinds == ["differential_privacy"] * 3 + ["none", "none"]


def test_sweep_and_other_options_from_the_command_line():
    opts = DPOptions.parse({"sweep": "2/4", "scope": "full", "noise": "true"}, "dp")
    labels = [c.config_label() for c in DPBackend.expand(opts)]
    assert labels == ["dp[scope=full,target_epsilon=2.0]", "dp[scope=full,target_epsilon=4.0]",
                      "dp[scope=full,target_epsilon=inf]", "dp[noise=False,scope=full]"]
    single = DPBackend.expand(DPOptions.parse({"target_epsilon": "inf"}, "dp"))
    assert [c.config_label() for c in single] == ["dp[target_epsilon=inf]"]


def test_planner_schedules_the_control_first_and_workers_rebuild_the_same_config():
    from suite.config import RunConfig
    from suite.planning import options_dict, plan_backends

    plans = plan_backends(RunConfig(backends=["dp"]))
    ids = [p.backend_id for p in plans]
    assert ids[:2] == ["plaintext", "dp[target_epsilon=inf]"]
    assert len(ids) == 6
    refs = {p.backend_id: p.reference for p in plans}
    assert refs["dp[target_epsilon=inf]"] is None
    assert refs["dp[target_epsilon=1.0]"] == "dp[target_epsilon=inf]"
    assert refs["dp[noise=False]"] == "dp[target_epsilon=inf]"
    for p in plans[1:]:  # the worker re-parses the JSON options: same configuration
        again = DPBackend(DPOptions.parse(options_dict(p.instance), "dp"))
        assert again.config_label() == p.backend_id


@pytest.mark.parametrize("bad", [{"scope": "backbone"}, {"grad_sample_mode": "fast"},
                                 {"target_epsilon": "0"}, {"mia_shadows": "3"},
                                 {"level": "site"}])
def test_bad_options_are_named(bad):
    with pytest.raises(SuiteError, match=next(iter(bad))):
        DPBackend(DPOptions.parse(bad, "dp"))


# ------------------------------------------------------------------ the controls really differ


def _toy(n=64, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3
    y = (torch.rand(n, 5, generator=g) < 0.3).float()
    return x, y


def _fit(privacy, noise_seed, x, y, sigma=1.0, max_grad_norm=0.1):
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 5)
    train(head, x, y, TrainConfig(epochs=3, batch_size=16, lr=0.05, privacy=privacy,
                                  noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                  seed=0, noise_seed=noise_seed))
    return torch.cat([p.detach().flatten() for p in head.parameters()])


def test_only_the_noisy_configuration_depends_on_the_noise_seed():
    x, y = _toy()
    clip_a, clip_b = _fit("clip", 1, x, y), _fit("clip", 2, x, y)
    dp_a, dp_a2, dp_b = _fit("dp", 1, x, y), _fit("dp", 1, x, y), _fit("dp", 2, x, y)
    none = _fit("none", 1, x, y)
    assert torch.equal(clip_a, clip_b)            # noise off: no noise was added
    assert torch.equal(dp_a, dp_a2)               # reproducible with the same seeds
    assert not torch.allclose(dp_a, dp_b)         # noise on: the noise draw matters
    assert not torch.allclose(none, clip_a)       # clipping at 0.1 changes the updates


def test_nonprivate_control_equals_dp_sgd_with_infinite_clip_and_no_noise():
    x, y = _toy()
    assert torch.allclose(_fit("none", 0, x, y), _fit("clip", 0, x, y, max_grad_norm=1e9), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_clipping_bounds_each_images_gradient():
    x, y = _toy(n=8)
    c = 0.05
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 5)
    run = prepare(head, x, y, TrainConfig(epochs=1, batch_size=8, lr=0.1, privacy="clip",
                                          max_grad_norm=c))
    raw_norms = []
    for i in range(len(x)):
        run.optimizer.zero_grad()
        run.loss_fn(run.model(x[i:i + 1]), y[i:i + 1]).backward()
        raw = torch.sqrt(sum((p.grad_sample ** 2).sum() for p in head.parameters()))
        raw_norms.append(float(raw))
        run.optimizer.clip_and_accumulate()
        clipped = torch.sqrt(sum((p.summed_grad ** 2).sum() for p in head.parameters()))
        assert float(clipped) <= c * (1 + 1e-4)
    run.close()
    assert min(raw_norms) > c                      # clipping was active on every image


def test_per_sample_loss_matches_the_recipe_loss_on_complete_labels():
    from suite.training import masked_bce

    x, y = _toy(n=10)
    z = torch.randn(10, 5)
    assert torch.allclose(PerSampleMaskedBCE()(z, y), masked_bce(z, y))


def test_densenet_is_made_opacus_compatible():
    from opacus.validators import ModuleValidator

    from suite.models import SMALL_DENSENET, build_densenet

    net = make_opacus_compatible(build_densenet(SMALL_DENSENET, 5))
    assert ModuleValidator.validate(net.train(), strict=False) == []
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_audit_split_holds_out_whole_patients(rng):
    pids = np.repeat(np.arange(30).astype(str), 2)
    train_idx, members, holdout = audit_split(pids, 0.2, rng)
    assert len(holdout) == 12 and len(members) == 12
    assert not set(pids[train_idx]) & set(pids[holdout])
    assert set(members) <= set(train_idx)


# ------------------------------------------------------------------ a tiny run, end to end


def _run(opts, tiny_data, tiny_model, tmp_path):
    """Through the harness: fit, predict, the audit phase, teardown."""
    from suite.harness import measure

    backend = DPBackend(DPOptions.parse(opts, "dp"))
    ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path, seed=0, quick=True)
    probs, timings, audit = measure(backend, ctx, tiny_data.split("test").subset(np.arange(5)),
                                    tiny_data.split("train"), progress=False)
    assert audit.status == "ok", audit.error
    assert timings.audit_s is not None and timings.fit_s is not None
    extra = {r["metric"]: r for r in backend.extra_rows()}
    assert not any(m.startswith("mia_") for m in extra)     # the audit is its own phase
    assert all(r["phase"] == "audit" for r in audit.rows)
    return backend, probs, {**extra, **{r["metric"]: r for r in audit.rows}}


def test_head_scope_run_reports_privacy_and_audit(tiny_data, tiny_model, tmp_path):
    backend, probs, rows = _run({"target_epsilon": 2.0, "epochs": 3, "batch_size": 16,
                                 "mia_shadows": 2}, tiny_data, tiny_model, tmp_path)
    assert probs.shape == (5, len(tiny_data.label_names))
    assert rows["epsilon"]["value"] <= rows["target_epsilon"]["value"] == 2.0
    assert rows["epsilon_independent"]["value"] <= rows["epsilon"]["value"] * 1.05
    assert rows["delta"]["value"] == pytest.approx(1 / (10 * rows["n_train_private"]["value"]))
    assert rows["training_budget"]["value"] == rows["steps"]["value"] * 13   # expected batch
    assert rows["noise_multiplier"]["value"] > 0 and rows["steps"]["value"] > 0
    for metric in ("mia_auroc", "mia_tpr_at_1pct_fpr", "mia_eps_lower_bound",
                   "mia_lira_auroc", "mia_lira_tpr_at_1pct_fpr", "mia_lira_eps_lower_bound"):
        assert metric in rows and rows[metric]["value"] is not None and rows[metric]["value"] >= 0
    tm = backend.threat_model()
    assert "vendor's own images only" in tm.protected_scope and "whole released model" in tm.guarantee
    assert "patient" in tm.guarantee


def test_fit_times_training_alone_and_reports_the_accountants_epsilon(tiny_data, tiny_model, tmp_path,
                                                                      monkeypatch):
    """Noise calibration, accounting and the PLD cross-check run in `prepare_fit` (setup),
    not in the timed fit; the epsilon reported is the one Opacus' accountant gives over the
    steps that really ran, and a run that did not take the planned steps is refused."""
    from dataclasses import replace

    import backends.dp.training as training

    train_set = tiny_data.split("train")
    ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path, seed=0)
    opts = DPOptions(target_epsilon=3.0, epochs=2, batch_size=16, mia_shadows=0, secure_mode=False)
    b = DPBackend(opts)
    b.setup(ctx)
    b.prepare_fit(train_set, ctx)
    plan = b._plan
    assert plan.sigma > 0 and plan.epsilon <= 3.0 and plan.crosscheck <= plan.epsilon * 1.05

    def refuse(*a, **k):
        raise AssertionError("calibration or accounting inside the timed fit")

    for name in ("noise_for_epsilon", "epsilon_for", "crosscheck_epsilon"):
        monkeypatch.setattr(training, name, refuse)
    b.fit(train_set, ctx)                                     # no calibration, no accounting
    assert b._report.epsilon == plan.epsilon and b._report.steps == plan.steps
    # positive control: a fit without the plan does calibrate, which the patch catches
    fresh = DPBackend(opts)
    fresh.setup(ctx)
    with pytest.raises(AssertionError, match="inside the timed fit"):
        fresh.fit(train_set, ctx)
    monkeypatch.undo()
    # Opacus' accountant over the same configuration's actual run gives the same epsilon
    x = b._inputs(train_set.images)[plan.train_idx]
    y = torch.from_numpy(np.ascontiguousarray(train_set.labels, dtype=np.float32))[plan.train_idx]
    groups = plan.groups_all[plan.train_idx]
    accounted = train(b._new_module(x.shape[1], y.shape[1], 0), x, y,
                      b._config(0, 17, plan.sigma, False), groups=groups)
    assert accounted.epsilon == pytest.approx(plan.epsilon, rel=1e-9)
    # positive control: a run that took other steps than planned is refused
    with pytest.raises(SuiteError, match="not the planned"):
        replace(plan, steps=plan.steps + 1).account(accounted)


def test_full_scope_trains_the_whole_groupnorm_densenet_with_per_sample_clipping(
        tiny_data, tiny_model, tmp_path):
    backend, probs, rows = _run({"noise": "false", "scope": "full", "epochs": 1, "batch_size": 32},
                                tiny_data, tiny_model, tmp_path)
    assert backend.mode == "ew" and backend.shadows == 0
    assert np.all((probs >= 0) & (probs <= 1))
    assert "epsilon" not in rows and rows["noise_multiplier"]["value"] == 0
    assert rows["max_grad_norm"]["value"] == 1.0
    assert "mia_auroc" in rows and "mia_lira_auroc" not in rows
    assert any(isinstance(m, torch.nn.GroupNorm) for m in backend.module.modules())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_ew_takes_small_and_empty_poisson_batches_on_the_densenet():
    """ew used to fail under 32 images (strided conv gradients) and refuses empty batches;
    the contiguous-gradient hooks and the noise-only step make it usable for DP-SGD."""
    from backends.dp.training import DenseNetLogits, noise_only_step
    from suite.models import SMALL_DENSENET, build_densenet

    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 32, 32) * 300, (torch.rand(6, 5) < 0.3).float()
    net = DenseNetLogits(make_opacus_compatible(build_densenet(SMALL_DENSENET, 5)))
    run = prepare(net, x, y, TrainConfig(epochs=1, batch_size=2, lr=1e-3, privacy="dp",
                                         noise_multiplier=1.0, grad_sample_mode="ew"))
    before = [p.detach().clone() for p in net.parameters()]
    noise_only_step(run.optimizer)                            # an empty batch: noise only
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    for xb, yb in ((x[:1], y[:1]), (x[:5], y[:5])):
        run.optimizer.zero_grad()
        run.loss_fn(run.model(xb), yb).backward()
        run.optimizer.step()
    assert run.engine.accountant.history[-1][2] == 3          # every step is accounted
    run.close()
    # positive control: without the hooks torch's small-batch path fails on this model
    bare = DenseNetLogits(make_opacus_compatible(build_densenet(SMALL_DENSENET, 5),
                                                 contiguous_conv_grads=False))
    run = prepare(bare, x, y, TrainConfig(epochs=1, batch_size=2, lr=1e-3, privacy="dp",
                                          noise_multiplier=1.0, grad_sample_mode="ew"))
    with pytest.raises(RuntimeError, match="view size"):
        run.loss_fn(run.model(x[:4]), y[:4]).backward()
    run.close()
