"""Issue 14, items 2 and 6: a run never writes into another run's folder; report, compare
and --resume refuse torn or invalid result files (naming file and line), skipping only a
torn last line of results.jsonl (the crash case) with a note; --resume refuses options
that contradict the saved run."""

from __future__ import annotations

import json
import shutil

import pytest

from suite.cli import main
from suite.config import RunConfig
from suite.errors import SuiteError
from suite.results import read_result_lines, read_results, read_run_state
from tests.conftest import REPO
from tests.test_reliability_inputs import one_line_error

EXAMPLE = REPO / "tests" / "data" / "example_run"


@pytest.fixture
def run_copy(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(EXAMPLE, out)
    return out


def _lines(path):
    return path.read_text().splitlines()


def _tear(path, lineno):
    """Cut line `lineno` (1-based) in half, as a crash or a careless edit would."""
    lines = _lines(path)
    lines[lineno - 1] = lines[lineno - 1][: len(lines[lineno - 1]) // 2]
    path.write_text("\n".join(lines) + ("\n" if lineno < len(lines) else ""))


# ---------------------------------------------------------------- results.jsonl

def test_torn_middle_line_is_refused_naming_file_and_line(run_copy):
    _tear(run_copy / "results.jsonl", 5)
    with pytest.raises(SuiteError, match=r"results.jsonl line 5 is not valid JSON"):
        read_results(run_copy / "results.jsonl")


def test_torn_last_line_is_skipped_with_a_note(run_copy, capsys):
    n = len(_lines(run_copy / "results.jsonl"))
    _tear(run_copy / "results.jsonl", n)
    df = read_results(run_copy / "results.jsonl")
    assert len(df) == n - 1
    assert f"skipped the torn last line {n}" in capsys.readouterr().err


def test_a_line_that_is_not_a_result_row_is_refused(run_copy):
    with open(run_copy / "results.jsonl", "a") as fh:
        fh.write('{"hello": 1}\n')
    n = len(_lines(run_copy / "results.jsonl"))
    with pytest.raises(SuiteError, match=rf"line {n} is not a result row \(lacks backend_id"):
        read_results(run_copy / "results.jsonl")


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_refuse_a_torn_results_file(run_copy, capsys, command):
    _tear(run_copy / "results.jsonl", 3)
    argv = [command, str(run_copy)] + ([str(EXAMPLE)] if command == "compare" else [])
    one_line_error(capsys, argv, f"{run_copy / 'results.jsonl'} line 3 is not valid JSON")


@pytest.mark.parametrize("command", ["report", "compare", "resume"])
def test_half_written_run_json_is_refused(run_copy, capsys, command):
    text = (run_copy / "run.json").read_text()
    (run_copy / "run.json").write_text(text[: len(text) // 2])
    argv = {"report": ["report", str(run_copy)], "compare": ["compare", str(EXAMPLE), str(run_copy)],
            "resume": ["run", "--resume", str(run_copy)]}[command]
    one_line_error(capsys, argv, f"{run_copy / 'run.json'} line ", "is not valid JSON", "torn")


def test_run_json_that_is_no_run_description(run_copy):
    (run_copy / "run.json").write_text('{"backends": {}}')
    with pytest.raises(SuiteError, match="is not a run description .lacks schema_version, run_id"):
        read_run_state(run_copy)


def test_compare_reads_a_clean_pair(capsys):
    assert main(["compare", str(EXAMPLE), str(EXAMPLE)]) == 0
    assert "auroc" in capsys.readouterr().out


# ---------------------------------------------------------------- --resume

@pytest.fixture
def saved_run(tmp_path):
    """A run folder as `suite run` leaves it at the start: run.json, no rows yet."""
    out = tmp_path / "saved"
    out.mkdir()
    cfg = RunConfig(backends=["plaintext", "null"], seed=0)
    state = {"schema_version": 2, "run_id": "r1", "config": cfg.as_dict(), "seed": 0,
             "dataset": {"name": "synthetic"}, "backends": {"plaintext": {"status": "pending"}}}
    (out / "run.json").write_text(json.dumps(state))
    (out / "results.jsonl").write_text("")
    return out


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "1"], "seed 1 (saved run: 0)"),
    (["--backends", "plaintext,mpc"], 'backends ["plaintext", "mpc"] (saved run: ["plaintext", "null"])'),
    (["--dataset", "folder"], 'dataset.name "folder" (saved run: "synthetic")'),
    (["--quick"], "quick true (saved run: false)"),
])
def test_resume_refuses_options_that_contradict_the_saved_run(saved_run, capsys, flags, needle):
    line = one_line_error(capsys, ["run", "--resume", str(saved_run), *flags], needle)
    assert "contradicts the saved run" in line


def test_resume_refuses_out_and_overwrite(saved_run, tmp_path, capsys):
    one_line_error(capsys, ["run", "--resume", str(saved_run), "--out", str(tmp_path / "x")], "drop --out")
    one_line_error(capsys, ["run", "--resume", str(saved_run), "--overwrite"], "contradict each other")


def test_resume_accepts_options_that_agree(saved_run):
    from argparse import Namespace

    from suite.commands import _resume_config

    args = Namespace(resume=str(saved_run), overwrite=False, out=None, config=None, seed=0,
                     backends="null,plaintext", dataset=None, data_dir=None, label_file=None,
                     model=None, quick=False, timeout=None)
    assert _resume_config(args).backends == ["plaintext", "null"]


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    one_line_error(capsys, ["run", "--resume", str(tmp_path)], "is not a run folder (no run.json)")


def test_resume_cuts_a_torn_tail_before_appending(tmp_path, capsys):
    from suite.runner import drop_rows, repair_torn_tail

    path = tmp_path / "results.jsonl"
    rows = [{"backend_id": b, "metric": "auroc", "status": "ok"} for b in ("plaintext", "null")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"backend_id": "nu')
    repair_torn_tail(path)
    assert read_result_lines(path)[1] is None and len(read_results(path)) == 2
    path.write_text(path.read_text() + '{"backend_id": "nu')
    drop_rows(path, "null")
    lines, torn = read_result_lines(path)
    assert torn is None and [r["backend_id"] for _, r in lines] == ["plaintext"]


# ---------------------------------------------------------------- --out onto a run

def test_out_onto_a_run_folder_is_refused(run_copy, capsys):
    before = (run_copy / "results.jsonl").read_bytes()
    one_line_error(capsys, ["run", "--out", str(run_copy), "--backends", "null"],
                   "already holds a run", f"--resume {run_copy}", "fresh --out", "--overwrite")
    assert (run_copy / "results.jsonl").read_bytes() == before


def test_out_onto_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    one_line_error(capsys, ["run", "--out", str(tmp_path), "--overwrite", "--backends", "null"],
                   "not empty and holds no run")
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_overwrite_clears_the_old_run_when_the_new_one_starts(run_copy):
    from suite.runner import check_out_dir, create_run_dir

    with pytest.raises(SuiteError, match="already holds a run"):
        check_out_dir(str(run_copy), "r2")
    run_dir = check_out_dir(str(run_copy), "r2", overwrite=True)
    assert (run_copy / "results.jsonl").exists()      # nothing is cleared before work starts
    create_run_dir(run_dir, overwrite=True)
    assert list(run_copy.iterdir()) == []


def test_default_out_never_reuses_a_folder(tmp_path, monkeypatch):
    from suite.runner import check_out_dir

    monkeypatch.setenv("SUITE_REPORTS_DIR", str(tmp_path))
    (tmp_path / "r1").mkdir()
    assert check_out_dir(None, "r1") == tmp_path / "r1-2"
