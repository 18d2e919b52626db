"""he:engine=desilo, the whole-network FHE engine: the compiled program, the polynomial
ReLU, and (in .venv-fhe) the real parties on a small program and one small image.

The compiler and the control run in the main environment; the parties run in .venv-fhe
(scripts/setup.sh creates it) and are skipped with the reason when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from backends.he.fhe_program import Program, relu_approx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model32():
    from suite.models import random_small_densenet

    return random_small_densenet(["a", "b"], 32, seed=3)


@pytest.fixture(scope="module")
def program32(model32):
    from backends.he.fhe_compile import compile_densenet

    return compile_densenet(model32.net, 32, 32768)


def _images(n, size, seed=0):
    from suite.data.synthetic import generate_synthetic

    return generate_synthetic(n_train_per_site=n, n_test_per_site=0, size=size, seed=seed).images


def test_exact_rewrites_reproduce_the_model(model32, program32):
    """BatchNorm folding, concat-free blocks, polyphase stem, max as b + relu(a - b): with the
    true ReLU the program equals the model; with the polynomial it is the control."""
    import torch

    from backends.he.fhe_compile import pack_image

    imgs = _images(2, 32, seed=5)
    with torch.no_grad():
        ref = model32.logits(torch.from_numpy(imgs)).double().numpy()
    for img, r in zip(imgs, ref):
        exact = program32.run_plain(pack_image(program32, img[0]), exact=True)
        assert np.abs(exact - r).max() <= 1e-6 * max(1.0, np.abs(r).max())
    # positive control: the same check catches a wrong rewrite (one weight perturbed)
    broken = Program.from_bytes(program32.to_bytes())
    broken.ops[0]["vals"][0] += 1.0
    bad = broken.run_plain(pack_image(broken, imgs[0][0]), exact=True)
    assert np.abs(bad - ref[0]).max() > 1e-6 * max(1.0, np.abs(ref[0]).max())


def test_polynomial_relu_is_exact_at_zero_and_close_elsewhere():
    x = np.linspace(-1, 1, 20001)
    err = np.abs(relu_approx(x) - np.maximum(x, 0))
    assert relu_approx(np.zeros(1))[0] == 0.0      # empty slots stay empty
    assert err.max() < 5e-3
    assert err[np.abs(x) > 2 ** -6].max() < 1e-3
    # positive control: the same bound rejects a composition too short for it
    short = np.abs(relu_approx(x, ("g3", "g3", "f3")) - np.maximum(x, 0))
    assert short[np.abs(x) > 2 ** -6].max() > 1e-3


def test_program_round_trips_and_counts_its_macs(program32):
    again = Program.from_bytes(program32.to_bytes())
    x = np.random.default_rng(0).uniform(-0.1, 0.1, program32.input_size)
    assert np.array_equal(again.run_plain(x), program32.run_plain(x))
    assert again.macs() == program32.macs() > 0
    assert again.relu_count() == program32.relu_count() > 10


def test_missing_venv_is_one_clear_line(monkeypatch, tmp_path):
    from backends.he import HEBackend
    from suite.errors import BackendUnavailable

    monkeypatch.setenv("FHE_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable, match="bash scripts/setup.sh"):
        HEBackend.create(HEBackend.Options.parse({"engine": "desilo"}, "he"))


def test_control_is_scheduled_with_the_row(monkeypatch):
    from backends.he import HEBackend
    from backends.he.fhe_engine import FHEPlaintextControl

    monkeypatch.setattr("backends.he.fhe_engine.fhe_available", lambda: True)
    row = HEBackend.create(HEBackend.Options.parse({"engine": "desilo"}, "he"))
    ctrl = row.reference()
    assert isinstance(ctrl, FHEPlaintextControl) and ctrl.config_label() == "he[engine=desilo-plaintext]"
    assert row.config_label() == "he[engine=desilo]" and ctrl.reference() == "plaintext"


# --------------------------------------------------------------------------- real parties

def _fhe_python() -> Path:
    from backends.he.fhe_engine import fhe_available, fhe_venv

    if not fhe_available():
        pytest.skip(f"{fhe_venv()}/ is missing: create it with `bash scripts/setup.sh`")
    return fhe_venv() / "bin" / "python"


@pytest.mark.slow
def test_evaluator_on_real_ciphertexts_matches_the_control_and_its_predicted_counts():
    """The model owner's evaluator (the code the whole-network pass runs: baby-step giant-step
    diagonals, hoisted rotations, the polynomial ReLU, a max) on real desilofhe ciphertexts of
    a small engine without bootstrapping; the level model predicts exactly its op counts."""
    python = _fhe_python()
    out = Path(tempfile.mkdtemp())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(python), str(ROOT / "tests" / "fhe_party_check.py"), str(out), "--small"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["max_abs_diff"] < 1e-3, res
    assert res["stats"]["rotations"] >= 2 and res["stats"]["polys"] == 1
    assert res["predicted"] == res["stats"]


@pytest.mark.slow
def test_parties_on_a_small_program_match_the_control_and_keep_the_secret_key():
    """Real desilofhe keys, bootstraps, rotations and polynomial ReLUs on a small program:
    decrypted logits match the float64 control, and no file the model owner reads holds a
    secret key (positive control: the secret key file is recognised as one)."""
    if os.environ.get("SUITE_FHE_E2E") != "1":
        pytest.skip("bootstrappable keys alone take 5-8 min on 2 loaded cores (a 3.85 GB roll key) and "
                    "one bootstrap takes 250 s on a quiet machine (976 s under load): past the test budget; set "
                    "SUITE_FHE_E2E=1 to run it")
    python = _fhe_python()
    out = Path(tempfile.mkdtemp())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(python), str(ROOT / "tests" / "fhe_party_check.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["bootstraps"] >= 1 and res["rotations"] >= 1
    assert res["max_abs_diff"] < 1e-3, res
    assert res["secret_key_files_for_model_owner"] == []
    assert res["control_secret_key_detected"]


def test_engine_options_refuse_bad_values_in_one_line():
    from types import SimpleNamespace

    from backends.he.fhe_engine import fhe_keys, fhe_resolution, relu_stages
    from backends.he.options import HEOptions
    from suite.errors import SuiteError

    assert relu_stages(HEOptions(fhe_relu_stages="g3-f3")) == ("g3", "f3")
    with pytest.raises(SuiteError, match="fhe_relu_stages='g3-x7'"):
        relu_stages(HEOptions(fhe_relu_stages="g3-x7"))
    ctx = SimpleNamespace(model=SimpleNamespace(resolution=64))
    assert fhe_resolution(ctx, HEOptions()) == 64 and fhe_resolution(ctx, HEOptions(fhe_resolution=32)) == 32
    with pytest.raises(SuiteError, match="fhe_resolution=16"):
        fhe_resolution(ctx, HEOptions(fhe_resolution=16))
    assert fhe_keys(HEOptions()) == "small+roll" and fhe_keys(HEOptions(fhe_keys="full-medium")) == "full-medium"
    with pytest.raises(SuiteError, match="fhe_keys='huge'"):
        fhe_keys(HEOptions(fhe_keys="huge"))


def test_a_polynomial_relu_fits_in_one_bootstrap(monkeypatch):
    """The default 5-stage ReLU takes 16 levels (3 per degree-7 stage + x * sign), so at the 17
    levels desilofhe leaves after a bootstrap every ReLU of a chain costs one bootstrap; the
    same chain at 4 levels per stage (desilofhe's evaluate_polynomial: 21 levels) costs more."""
    import backends.he.fhe_eval as fhe_eval
    from backends.he.fhe_eval import predict_counts
    from backends.he.fhe_program import relu_depth

    n, k = 8, 4
    ops = [{"op": "relu", "dst": f"r{i + 1}", "src": f"r{i}" if i else "x", "k": 1.0} for i in range(k)]
    ops.append({"op": "linear", "dst": "logits", "src": f"r{k}", "rows": np.arange(n), "cols": np.arange(n),
                "vals": np.ones(n), "bias": np.zeros(0), "acc": False})
    prog = Program(slots=64, ops=ops, input_size=n, n_labels=1)
    assert relu_depth() == 16
    assert predict_counts(prog, 17, 17, input_level=0)["bootstraps"] == k
    monkeypatch.setattr(fhe_eval, "STAGE_LEVELS", 4)                           # positive control
    assert predict_counts(prog, 17, 17, input_level=0)["bootstraps"] > k
