"""A hybrid of two techniques is a composition the planner understands: `dp:...>mpc` trains
with DP-SGD, then serves the released model through two-party MPC, as its own row with a
threat model that states both guarantees, each for its own asset."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from suite.config import BackendSpec, RunConfig
from suite.errors import SuiteError
from suite.planning import plan_backends

TINY = Path(__file__).with_name("tiny.toml")


def _plans(backends: list[str]):
    return {p.backend_id: p for p in plan_backends(RunConfig(backends=backends))}


def test_spec_parses_a_composition():
    spec = BackendSpec.parse("dp:target_epsilon=3>mpc:max_images=8")
    assert spec.name == "dp" and dict(spec.options) == {"target_epsilon": "3"}
    assert spec.served_by == BackendSpec("mpc", (("max_images", "8"),))
    with pytest.raises(SuiteError, match="TRAINING>INFERENCE"):
        BackendSpec.parse("dp>mpc>he")


def test_planner_schedules_trainer_then_server_with_a_composed_threat_model():
    plans = _plans(["dp:target_epsilon=3>mpc"])
    composed = [p for p in plans.values() if p.model_from]
    assert len(composed) == 1
    row = composed[0]
    assert row.backend_id == f"{row.model_from}>mpc" and row.reference == row.model_from
    assert row.model_from in plans and plans[row.model_from].track == "training"
    order = list(plans)
    assert order.index(row.model_from) < order.index(row.backend_id)
    tm = row.threat_model()
    assert tm.guarantee_kind == "composite"
    assert {"training_membership", "input_images", "model_weights"} <= set(tm.protects)
    assert "differential" in tm.guarantee.lower() or "epsilon" in tm.guarantee.lower()
    assert any(a.startswith("mpc") for a in tm.trust_assumptions)
    assert any(a.startswith(row.model_from) for a in tm.trust_assumptions)


@pytest.mark.parametrize("bad,match", [("mpc>dp", "trains no model"), ("dp>fl", "does not serve"),
                                       ("plaintext>mpc", "trains no model")])
def test_compositions_that_make_no_sense_are_refused(bad, match):
    with pytest.raises(SuiteError, match=match):
        _plans([bad])


@pytest.mark.slow
def test_composed_row_serves_the_released_model(tmp_path):
    """End to end on tiny data: the MPC row serves the checkpoint the DP row released, and its
    outputs match the DP model's plaintext outputs (its reference)."""
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("run", "--config", str(TINY), "--backends",
                   "dp:target_epsilon=3:epochs=1:mia_shadows=0>mpc:max_images=4:batch_size=4",
                   "--out", str(out), "--no-report", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = json.loads((out / "run.json").read_text())
    composed = [k for k in state["backends"] if ">" in k]
    assert len(composed) == 1 and state["backends"][composed[0]]["status"] == "ok"
    preds = pd.read_parquet(out / "predictions.parquet")
    served = preds[preds.backend_id == composed[0]].set_index(["image_id", "label"])["prob"]
    trainer = composed[0].split(">")[0]
    trained = preds[preds.backend_id == trainer].set_index(["image_id", "label"])["prob"]
    assert (served - trained.loc[served.index]).abs().max() < 1e-3
    # the checkpoint it served is the one the DP row released (on tiny data one DP epoch barely
    # moves the vendor's head, so the outputs alone cannot tell the two models apart)
    from suite.run_folder import RunFolder

    released = RunFolder(out).released_model(trainer)
    assert released.exists()
    job = json.loads(RunFolder(out).job(composed[0]).read_text())
    assert job["model_ref"] == {"kind": "checkpoint", "path": str(released)}
