"""`--resume` runs a failed configuration again: its old rows and files are dropped first, so
nothing is counted twice, and configurations that were fine are not re-run."""

from __future__ import annotations

import json

from suite.results import read_results
from tests.conftest import REPO, run_cli
from tests.flaky_backend import EXTRA

TINY = str(REPO / "tests" / "tiny.toml")
KEY = ["backend_id", "site", "label", "metric", "party", "phase"]


def test_resume_reruns_a_failed_configuration(tmp_path):
    out = tmp_path / "r"
    first = run_cli("run", "--config", TINY, "--model", "small-densenet-untrained", "--backends", "flaky,null",
                    "--out", str(out), "--no-report",
                    env={"SUITE_EXTRA_BACKENDS": EXTRA, "SUITE_TEST_FLAKY": "fail"})
    assert first.returncode == 3, first.stderr[-3000:]
    state = json.loads((out / "run.json").read_text())["backends"]
    assert state["flaky"]["status"] == "failed" and "deliberate failure" in state["flaky"]["error"]
    before = read_results(out / "results.jsonl")
    assert set(before[before.backend_id == "flaky"].status) == {"failed"}
    null_before = before[before.backend_id == "null"].sort_values(KEY).reset_index(drop=True)

    again = run_cli("run", "--resume", str(out), "--no-report", env={"SUITE_EXTRA_BACKENDS": EXTRA})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "flaky" in again.stdout and "[1/1]" in again.stdout     # only the failed one ran
    state = json.loads((out / "run.json").read_text())["backends"]
    assert state["flaky"]["status"] == "ok" and state["flaky"]["error"] is None
    after = read_results(out / "results.jsonl")
    flaky = after[after.backend_id == "flaky"]
    assert "failed" not in set(flaky.status) and (flaky.metric == "auroc").any()
    assert not after.duplicated(KEY).any()
    null_after = after[after.backend_id == "null"].sort_values(KEY).reset_index(drop=True)
    assert null_after[["metric", "value"]].equals(null_before[["metric", "value"]])   # kept, not re-run

    # positive control: the same resume once nothing has failed starts no worker, so the re-run
    # above happened because the configuration had failed
    third = run_cli("run", "--resume", str(out), "--no-report", env={"SUITE_EXTRA_BACKENDS": EXTRA})
    assert third.returncode == 0 and "[1/" not in third.stdout, third.stdout
    assert len(read_results(out / "results.jsonl")) == len(after)          # nothing added twice
