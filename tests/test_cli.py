"""The CLI as a user meets it: one-line errors, exit status, nothing lost.

The first test goes through `python -m suite` in a subprocess, as a user runs it (so a
warning or traceback printed by the real entry point would fail it); the other refusals call
the same `main()` in-process (`run_main`), which saves a torch import per test."""

from __future__ import annotations


import pytest

from tests.conftest import REPO, run_cli, run_main

TINY = str(REPO / "tests" / "tiny.toml")


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_backend_suggests_nearest(tmp_path):
    _one_line_error(run_cli("run", "--config", TINY, "--backends", "plaintxt", "--out", str(tmp_path)),
                    "unknown backend 'plaintxt'", "did you mean 'plaintext'")


def test_unknown_dataset_suggests_nearest(tmp_path):
    _one_line_error(run_main("run", "--config", TINY, "--dataset", "synthtic", "--out", str(tmp_path)),
                    "unknown dataset 'synthtic'", "synthetic")


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dataset]\nn_train_per_sit = 3\n")
    _one_line_error(run_main("run", "--config", str(bad)), "dataset.n_train_per_sit",
                    "did you mean 'n_train_per_site'")


def test_unknown_backend_option_is_named(tmp_path):
    _one_line_error(run_main("run", "--config", TINY, "--backends", "plaintext:batchsize=4",
                            "--out", str(tmp_path)), "no option 'batchsize'", "batch_size")


def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("precious")
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        _one_line_error(run_main("run", "--config", TINY, "--out", str(locked / "run")), "not writable")
    finally:
        locked.chmod(0o700)
    assert (locked / "keep.txt").read_text() == "precious"


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("precious")
    _one_line_error(run_main("run", "--config", TINY, "--out", str(f)), "is an existing file, not a folder")
    assert f.read_text() == "precious"


def test_report_on_a_non_run_folder(tmp_path):
    _one_line_error(run_main("report", str(tmp_path)), "not a run folder")


def test_missing_checkpoint(tmp_path):
    _one_line_error(run_main("run", "--config", TINY, "--model", str(tmp_path / "nope.pt"),
                            "--out", str(tmp_path / "r")), "checkpoint not found")


def test_xrv_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    proc = run_main("run", "--config", TINY, "--model", "xrv:densenet121-res224-all",
                    "--out", str(tmp_path / "r"))
    _one_line_error(proc, "densenet121-res224-all", "place ", ".pt")


def test_list_shows_backends_datasets_models():
    proc = run_main("list")
    assert proc.returncode == 0, proc.stderr
    for word in ("plaintext", "null", "synthetic", "small-densenet", "xrv:"):
        assert word in proc.stdout


REFUSAL_PROBE = r"""
import sys
from suite.cli import main
rc = main(["run", "--backends", "nosuch", "--out", sys.argv[1]])
print(rc, "torch" in sys.modules, "torchxrayvision" in sys.modules)
import suite.models    # positive control: the probe sees torch once something imports it
print("torch" in sys.modules)
"""


def test_a_refusal_imports_no_torch(tmp_path):
    """`python -m suite run --backends nosuch` refuses in one line before torch loads (it once
    took ~27 s under load importing torch for nothing)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", REFUSAL_PROBE, str(tmp_path / "r")], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    lines = proc.stdout.split()
    assert lines[:3] == ["2", "False", "False"], (proc.stdout, proc.stderr)
    assert lines[3] == "True"
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown backend 'nosuch'")
    assert not (tmp_path / "r").exists()


def test_help_imports_no_torch():
    import subprocess
    import sys

    probe = ("import sys\nfrom suite.cli import main\nrc = main(['run', '--help'])\n"
             "print('RESULT', rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.stdout.split()[-3:] == ["RESULT", "0", "False"], proc.stdout[-500:]
