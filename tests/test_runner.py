"""End to end through the CLI on a tiny run: files, failures, time limits, resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from suite.results import read_result_lines, read_results
from tests.conftest import REPO, run_cli, run_main
from tests.faulty_backends import EXTRA
from tests.forkserver_entries import EXTRA as SEGFAULT
from tests.shared_runs import SLOW_BACKEND

TINY = str(REPO / "tests" / "tiny.toml")
FAULTY = {"SUITE_EXTRA_BACKENDS": EXTRA + "," + SEGFAULT}


@pytest.fixture(scope="module")
def tiny_run(tiny_cli_run):
    """tiny.toml's run (plaintext, null) plus tests/test_progress.py's slow backend, which
    asserts its progress line on the same run (tests/conftest.py `tiny_cli_run`)."""
    return tiny_cli_run


def test_run_writes_every_file(tiny_run):
    out, proc = tiny_run
    for name in ("run.json", "results.jsonl", "predictions.parquet", "leaderboard.csv",
                 "leaderboard.md", "report.html"):
        assert (out / name).exists(), name
    assert "plaintext" in proc.stdout  # the leaderboard is printed


def test_results_are_tidy_rows(tiny_run):
    out, _ = tiny_run
    df = read_results(out / "results.jsonl")
    for col in ("value", "ci_low", "ci_high", "n", "unit", "higher_is_better", "status", "error",
                "schema_version", "run_id", "config_hash", "seed", "tm_guarantee", "tm_protects"):
        assert col in df.columns, col
    auroc = df[(df.metric == "auroc") & (df.backend_id == "plaintext")]
    sites = set(json.loads((out / "run.json").read_text())["dataset"]["sites"])
    assert sites | {"__all__"} == set(auroc.site)
    assert {"__macro__", "Cardiomegaly"} <= set(auroc.label)
    with_ci = auroc.dropna(subset=["value", "ci_low"])
    assert len(with_ci) > len(auroc) / 2
    assert with_ci.eval("ci_low <= value <= ci_high").all()
    assert auroc[auroc.ci_low.isna()].note.notna().all()  # a missing CI says why
    assert not df.duplicated(["backend_id", "site", "label", "metric", "party", "phase"]).any()


def test_predictions_have_one_row_per_backend_image_label(tiny_run):
    out, _ = tiny_run
    p = pd.read_parquet(out / "predictions.parquet")
    assert {"backend", "backend_id", "image_id", "site", "label", "y_true", "prob"} <= set(p.columns)
    per = p.groupby("backend_id").size()
    n_test = json.loads((out / "run.json").read_text())["dataset"]["n_test"]
    assert (per == n_test * 5).all()
    assert p.prob.between(0, 1).all()


def test_report_command_rerenders_from_the_folder_alone(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("parts", "work"))
    (copy / "report.html").unlink()
    proc = run_main("report", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert (copy / "report.html").stat().st_size > 10_000


def test_compare_two_runs(tiny_run):
    out, _ = tiny_run
    proc = run_main("compare", str(out), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "latency_per_image_p50" in proc.stdout


# One run holds every faulty backend, the hanging one included: a raise, an os._exit, a
# segfault, a bad shape and a hang each cost only their configuration, and the null worker
# forked after them all still runs. Its limit is short, because a hang costs the whole limit;
# it starts when a worker is forked from the warm server (after the server's one-off preload),
# and the healthy workers here (null, the plaintext reference on 56 tiny images) take 2-3 s
# on a host loaded 15 deep, so 15 s leaves them room.
FAULTY_BACKENDS = "raising,crashing,segfault,badshape,hanging,null"
FAULTY_LIMIT_S = 15


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty") / "r"
    proc = run_cli("run", "--config", TINY, "--out", str(out), "--timeout", str(FAULTY_LIMIT_S),
                   "--backends", FAULTY_BACKENDS, env=FAULTY)
    return out, proc


def test_failures_are_recorded_and_the_run_goes_on(faulty_run):
    """Workers forked from the run's fork server: a raise, an os._exit and a segfault each
    cost only their configuration."""
    out, proc = faulty_run
    # finished, but not all well: a distinct exit status, said in the last line
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: 5 of 7 backend configurations failed"), last
    assert all(name in last for name in ("raising", "crashing", "segfault", "badshape", "hanging")), last
    run_state = json.loads((out / "run.json").read_text())
    assert run_state["worker_start"]["mode"] == "fork-server"
    state = run_state["backends"]
    assert state["raising"]["status"] == "failed"
    assert "deliberate failure" in state["raising"]["error"]
    assert "exit code 9" in state["crashing"]["error"]
    assert "killed by SIGSEGV" in state["segfault"]["error"]
    assert "shape" in state["badshape"]["error"]
    assert state["null"]["status"] == "ok" and state["plaintext"]["status"] == "ok"
    df = read_results(out / "results.jsonl")
    failed = df[df.status == "failed"]
    assert set(failed.backend_id) == {"raising", "crashing", "segfault", "badshape", "hanging"}
    assert failed.error.notna().all()


def test_a_hanging_backend_is_stopped_at_the_time_limit(faulty_run):
    """The hang is stopped at the run's limit and the next forked worker (null) still runs."""
    out, proc = faulty_run
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: 5 of") and "hanging" in last, last
    state = json.loads((out / "run.json").read_text())["backends"]
    assert list(state).index("hanging") < list(state).index("null")     # null was forked after it
    assert state["hanging"]["status"] == "failed"
    assert f"timed out after {FAULTY_LIMIT_S} s" in state["hanging"]["error"]
    assert state["null"]["status"] == "ok"                # the next forked worker ran
    failed = read_results(out / "results.jsonl").query("status == 'failed'")
    assert "hanging" in set(failed.backend_id) and failed.error.notna().all()


def test_resume_finishes_an_interrupted_run_without_duplicates(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    run = tmp_path / "r"
    shutil.copytree(out, run)
    state = json.loads((run / "run.json").read_text())
    state["backends"]["null"]["status"] = "running"          # died mid-way
    (run / "run.json").write_text(json.dumps(state))
    before = read_results(run / "results.jsonl")
    with open(run / "results.jsonl", "a") as fh:                # ... while appending a row
        fh.write('{"backend_id": "null", "metr')
    proc = run_cli("run", "--resume", str(run), env=SLOW_BACKEND)      # the run names the slow backend
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped the torn last line" in proc.stderr
    lines, torn = read_result_lines(run / "results.jsonl")      # the torn tail was cut, not glued to
    assert torn is None
    after = read_results(run / "results.jsonl")
    assert len(after) == len(before)
    assert not after.duplicated(["backend_id", "site", "label", "metric", "party", "phase"]).any()
    assert json.loads((run / "run.json").read_text())["backends"]["null"]["status"] == "ok"


def test_empty_dataset_is_a_clear_error(tmp_path):
    cfg = tmp_path / "empty.toml"
    cfg.write_text(open(TINY).read().replace("n_test_per_site = 8", "n_test_per_site = 0"))
    proc = run_main("run", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no 'test' images" in proc.stderr


def test_out_onto_an_existing_run_is_refused(tiny_run):
    """Two runs in one folder once mixed on one leaderboard (old null rows, new plaintext)."""
    out, _ = tiny_run
    before = (out / "results.jsonl").read_bytes()
    proc = run_main("run", "--config", TINY, "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--resume {out}" in lines[0] and "fresh --out" in lines[0], proc.stderr
    assert (out / "results.jsonl").read_bytes() == before
