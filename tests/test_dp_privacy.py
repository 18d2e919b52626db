"""What the dp rows claim, each with the failure it must catch: CSPRNG noise an adversary
holding the run folder cannot regenerate, the patient as privacy unit, an epsilon an
independent accountant agrees with, one training budget per entry, and the audit phase."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
pytest.importorskip("dp_accounting")

from backends.dp.backend import DPBackend, DPOptions, check_epsilon, patient_groups  # noqa: E402
from backends.dp.training import (TrainConfig, Uniforms, crosscheck_epsilon, csprng_gaussian,  # noqa: E402
                                  epsilon_for, noise_for_epsilon, prepare, steps_and_rate, train)
from suite.backend import BackendContext  # noqa: E402
from suite.errors import SuiteError  # noqa: E402
from suite.harness import measure  # noqa: E402
from suite.meter import CommMeter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def _toy(n=64, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, (torch.rand(n, 5, generator=g) < 0.3).float()


def _weights_after_training(secure: bool, x, y):
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 5)
    train(head, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.05, privacy="dp",
                                  noise_multiplier=1.0, seed=0, noise_seed=0, secure=secure))
    return torch.cat([p.detach().flatten() for p in head.parameters()])


# ------------------------------------------------------------------ CSPRNG noise and sampling

def test_an_adversary_with_the_seed_regenerates_seeded_noise_but_not_csprng_noise():
    x, y = _toy()
    # the attack: re-run the published recipe with the published seed, compare the model
    seeded = [_weights_after_training(False, x, y) for _ in range(2)]
    assert torch.equal(*seeded)                    # insecure: the noise is regenerated exactly
    secure = [_weights_after_training(True, x, y) for _ in range(2)]
    assert not torch.allclose(*secure)             # CSPRNG: the same seed tells nothing


def test_csprng_gaussian_has_the_requested_distribution():
    z = csprng_gaussian((400, 500), 2.5, Uniforms(True)).numpy().ravel()
    assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(2.5, rel=0.01)
    kurtosis = np.mean((z - z.mean()) ** 4) / z.var() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    a, b = csprng_gaussian((1000,), 1.0, Uniforms(True)), csprng_gaussian((1000,), 1.0, Uniforms(True))
    assert not torch.equal(a, b)


def test_secure_dp_sgd_adds_noise_of_std_sigma_times_clip():
    x, _ = _toy(n=32, d=400)
    y = (torch.rand(32, 50, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 50)
    sigma, clip = 3.0, 0.5
    run = prepare(layer, x, y, TrainConfig(epochs=1, batch_size=32, lr=0.1, privacy="dp",
                                           noise_multiplier=sigma, max_grad_norm=clip, secure=True))
    run.optimizer.zero_grad()
    run.loss_fn(run.model(x), y).backward()
    run.optimizer.pre_step()
    noise = torch.cat([(p.grad * run.expected_batch_size - p.summed_grad).flatten()
                       for p in layer.parameters()])
    run.close()
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(float(noise.mean())) < 0.05


def test_secure_poisson_sampling_has_rate_q():
    from backends.dp.training import PoissonBatches

    sizes = [len(b) for b in PoissonBatches(1000, 0.1, 200, Uniforms(True))]
    assert len(sizes) == 200 and np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.1 * 0.9), rel=0.2)


# ------------------------------------------------------------------ the patient as privacy unit

def _batches_patients(groups):
    """Patients of every image in every Poisson batch of one epoch-long run."""
    n = len(groups)
    x = torch.arange(n, dtype=torch.float32)[:, None]          # row id as the only feature
    y = torch.zeros(n, 5)
    run = prepare(torch.nn.Linear(1, 5), x, y,
                  TrainConfig(epochs=1, batch_size=8, lr=0.1, privacy="none", seed=1),
                  groups=groups)
    return [groups[xb[:, 0].long().numpy()] for xb, _ in run.loader]


def test_patient_level_batches_hold_at_most_one_image_per_patient():
    groups = np.repeat(np.arange(12), 5)                        # 12 patients x 5 films
    batches = _batches_patients(groups)
    assert sum(len(b) for b in batches) > 0
    assert all(len(set(b.tolist())) == len(b) for b in batches)
    # positive control: sampling images (example-level) puts a patient in a batch twice
    x = torch.arange(60, dtype=torch.float32)[:, None]
    run = prepare(torch.nn.Linear(1, 5), x, torch.zeros(60, 5),
                  TrainConfig(epochs=1, batch_size=30, lr=0.1, privacy="none", seed=1))
    image_level = [groups[xb[:, 0].long().numpy()] for xb, _ in run.loader]
    assert any(len(set(b.tolist())) < len(b) for b in image_level)


def test_patient_level_accounts_over_patients(tiny_data, tiny_model, tmp_path):
    train_set = tiny_data.split("train")
    paired = train_set.subset(np.arange(len(train_set)))
    paired.patient_ids = np.array([f"p{i // 2}" for i in range(len(paired))])   # 2 films each
    rows = {}
    for level in ("patient", "image"):
        b = DPBackend(DPOptions(target_epsilon=3.0, epochs=1, batch_size=8, mia_shadows=0,
                                level=level, secure_mode=False))
        ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path, seed=0)
        b.setup(ctx)
        b.fit(paired, ctx)
        rows[level] = {r["metric"]: r for r in b.extra_rows()}
        assert level in b.threat_model().guarantee or level in b.threat_model().notes
    n_pat, n_img = rows["patient"]["n_train_private"]["value"], rows["image"]["n_train_private"]["value"]
    assert n_img == 2 * n_pat
    assert rows["patient"]["delta"]["value"] == pytest.approx(1 / (10 * n_pat))
    assert "patient" in rows["patient"]["epsilon"]["note"]


def test_patient_groups_name_each_patient_once():
    g = patient_groups(np.array(["b", "a", "b", "c"]))
    assert g.tolist() == [1, 0, 1, 2]


# ------------------------------------------------------------------ an epsilon two accountants agree on

@pytest.mark.parametrize("target", [1.0, 8.0])
def test_independent_accountant_agrees_with_the_reported_epsilon(target):
    steps, q = steps_and_rate(1680, 256, 20)
    delta = 1 / 16800
    sigma = noise_for_epsilon(target, delta, q, steps)
    reported, independent = epsilon_for(sigma, q, steps, delta), crosscheck_epsilon(sigma, q, steps, delta)
    check_epsilon(reported, independent)              # passes: RDP bounds PLD from above
    assert independent <= reported <= target


def test_a_miscalibrated_epsilon_is_caught():
    steps, q = steps_and_rate(1680, 256, 20)
    delta = 1 / 16800
    sigma = noise_for_epsilon(1.0, delta, q, steps)
    # the bug to catch: the noise was calibrated for twice the sensitivity actually used
    optimistic = epsilon_for(2 * sigma, q, steps, delta)
    with pytest.raises(SuiteError, match="too optimistic"):
        check_epsilon(optimistic, crosscheck_epsilon(sigma, q, steps, delta))


# ------------------------------------------------------------------ one budget, audit as a phase

def test_every_row_of_an_entry_spends_the_same_budget_and_a_failed_audit_is_recorded(
        tiny_data, tiny_model, tmp_path, monkeypatch):
    budgets, starts = {}, {}
    for backend in DPBackend.expand(DPOptions(sweep=(3.0,), epochs=1, batch_size=16,
                                              mia_shadows=0, secure_mode=False)):
        ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path, seed=0)
        if backend.regime == "clip":     # an audit that breaks: recorded, predictions kept
            monkeypatch.setattr(DPBackend, "run_attacks", lambda self: 1 / 0)
        probs, timings, audit = measure(backend, ctx, tiny_data.split("test"),
                                        tiny_data.split("train"), progress=False)
        rows = {r["metric"]: r["value"] for r in backend.extra_rows()}
        budgets[backend.regime] = (rows["training_budget"], rows["steps"], rows["n_train_private"])
        starts[backend.regime] = backend._new_module(tiny_model.net.classifier.in_features, 5, 0).weight
        assert probs.shape[0] == len(tiny_data.split("test"))
        if backend.regime == "clip":
            assert audit.status == "failed" and "ZeroDivisionError" in audit.error
        else:
            assert audit.status == "ok" and audit.rows
    assert len(set(budgets.values())) == 1, budgets
    assert torch.equal(starts["dp"], starts["none"]) and torch.equal(starts["dp"], starts["clip"])
    assert torch.equal(starts["dp"], tiny_model.net.classifier.weight)   # the vendor's head
