"""Issue 14, items 5 and 7: every config value and CLI option is checked by type and range
with a one-line error naming the key; the smaller traps (empty --backends, duplicates,
bracketed names in `compare`, bad --model files, a checkpoint at the wrong resolution,
--out onto a file or a locked folder, help that states the real defaults).

In-process through `suite.cli.main`, so each case costs milliseconds, not a Python start."""

from __future__ import annotations

import io

import psutil
import pytest

from suite.cli import main
from tests.conftest import REPO

TINY = str(REPO / "tests" / "tiny.toml")


def one_line_error(capsys, argv, *needles, code=2):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("section,line,needle", [
    ("run", 'timeout_s = "five minutes"', "run.timeout_s must be a number"),
    ("run", 'seed = "zero"', "run.seed must be an integer"),
    ("run", "seed = -1", "run.seed must be at least 0"),
    ("run", "backends = 5", "run.backends must be a list of strings"),
    ("run", "backends = []", "run.backends must not be empty"),
    ("run", "timeout_s = 0", "run.timeout_s must be greater than 0"),
    ("run", "timeout_s = -1.5", "run.timeout_s must be greater than 0"),
    ("run", "threads = true", "run.threads must be an integer, got a boolean"),
    ("run", "quick = 1", "run.quick must be true or false"),
    ("dataset", 'resolution = "big"', "dataset.resolution must be an integer"),
    ("dataset", "resolution = 8", "dataset.resolution must be at least 32"),
    ("dataset", "n_train_per_site = -3", "dataset.n_train_per_site must be at least 1"),
    ("dataset", "test_fraction = 1.5", "dataset.test_fraction must be less than 1"),
    ("dataset", "max_images = true", "dataset.max_images must be an integer, got a boolean"),
    ("dataset", 'on_bad_image = "ignore"', "dataset.on_bad_image must be one of fail, skip"),
    ("dataset", 'views = "PA"', "dataset.views must be a list of strings"),
    ("model", "epochs = 0", "model.epochs must be at least 1"),
    ("model", 'lr = "fast"', "model.lr must be a number"),
])
def test_wrong_type_or_range_in_toml_is_one_line_naming_the_key(tmp_path, capsys, section, line, needle):
    cfg = _toml(tmp_path, f"[{section}]\n{line}\n")
    one_line_error(capsys, ["run", "--config", cfg, "--out", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()


def test_good_toml_values_still_load(tmp_path):
    from suite.config import load_config

    cfg = load_config(_toml(tmp_path, '[run]\nbackends = "plaintext,null"\ntimeout_s = 5\n'
                                      '[dataset]\nresolution = 32\n[model]\nlr = 1\n'))
    assert cfg.backends == ["plaintext", "null"]
    assert cfg.timeout_s == 5.0 and isinstance(cfg.timeout_s, float) and cfg.model.lr == 1.0


def test_section_that_is_not_a_table(tmp_path, capsys):
    one_line_error(capsys, ["run", "--config", _toml(tmp_path, "run = 3\n")], "'run' must be a section")


@pytest.mark.parametrize("argv,needle", [
    (["--timeout", "0"], "argument --timeout: must be a positive number of seconds, got '0'"),
    (["--timeout", "-1"], "argument --timeout: must be a positive number of seconds, got '-1'"),
    (["--timeout", "nan"], "argument --timeout: must be a positive number"),
    (["--timeout", "soon"], "argument --timeout: expects a number of seconds"),
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--seed", "zero"], "argument --seed: expects an integer"),
    (["--backends", ""], "--backends is empty"),
    (["--backends", " , "], "--backends is empty"),
])
def test_bad_cli_option_is_one_line(tmp_path, capsys, argv, needle):
    one_line_error(capsys, ["run", "--config", TINY, "--out", str(tmp_path / "r"), *argv], needle)
    assert not (tmp_path / "r").exists()


def test_train_epochs_zero_is_refused(tmp_path, capsys):
    one_line_error(capsys, ["train", "--out", str(tmp_path / "m.pt"), "--epochs", "0"],
                   "argument --epochs: must be at least 1")


def test_flags_of_zero_are_not_ignored():
    """`if args.timeout:` once turned --timeout 0 into the 900 s default; 0-valued flags count."""
    from argparse import Namespace

    from suite.commands import _apply_run_flags
    from suite.config import RunConfig

    cfg = _apply_run_flags(RunConfig(), Namespace(backends=None, seed=0, timeout=0.5, quick=False))
    assert cfg.timeout_s == 0.5 and cfg.seed == 0


@pytest.mark.parametrize("spec,needle", [
    ("he:max_images=-270", "backend 'he' option 'max_images' must be at least 0, got -270"),
    ("mpc:max_images=true", "backend 'mpc' option 'max_images' expects an integer, got 'true'"),
    ("tee:cvm_factor=nan", "backend 'tee' option 'cvm_factor' must be a number, got nan"),
    ("tee:reply_timeout_s=-5", "backend 'tee' option 'reply_timeout_s' must be at least 0"),
    ("dp:sweep=1/-3", "backend 'dp' option 'sweep' must be at least 0"),
    ("null:batch_size=2:batch_size=3", "option 'batch_size' is given twice"),
])
def test_bad_backend_option_on_the_command_line(tmp_path, capsys, spec, needle):
    one_line_error(capsys, ["run", "--config", TINY, "--backends", spec, "--out", str(tmp_path / "r")],
                   needle)


@pytest.mark.parametrize("table,needle", [
    ("[backends.mpc]\nmax_images = true\n", "option 'max_images' expects an integer, got a boolean (true)"),
    ("[backends.he]\nmax_images = -270\n", "option 'max_images' must be at least 0, got -270"),
    ("[backends.tee]\nprofile = 3\n", "option 'profile' expects a string, got an integer (3)"),
    ("[backends.tee]\nsgx_partitioned = 1\n", "option 'sgx_partitioned' expects true or false"),
    ("[backends]\nmpc = 4\n", "'backends.mpc' is an integer"),
])
def test_bad_backend_option_in_toml_leaves_no_worker(tmp_path, capsys, table, needle):
    """The value is refused while planning, before any worker starts: none can be left behind."""
    backend = table.split(".")[1].split("]")[0] if "[backends." in table else "mpc"
    cfg = _toml(tmp_path, open(TINY).read().replace('backends = ["plaintext", "null"]',
                                                    f'backends = ["{backend}"]') + table)
    before = set(psutil.Process().children(recursive=True))   # another test's are not this one's
    one_line_error(capsys, ["run", "--config", cfg, "--out", str(tmp_path / "r")], needle)
    assert set(psutil.Process().children(recursive=True)) - before == set()
    assert not (tmp_path / "r").exists()


def test_good_backend_options_parse_to_their_types():
    from suite.config import RunConfig
    from suite.planning import plan_backends

    cfg = RunConfig(backends=["mpc", "tee:cvm_factor=1:sgx_partitioned=true"])
    cfg.backend_options = {"mpc": {"max_images": 4, "timeout_s": 60}}
    plans = {p.backend_id: p for p in plan_backends(cfg)}
    assert plans["mpc[max_images=4,timeout_s=60.0]"].options["max_images"] == 4
    tee = [p for p in plans.values() if p.name == "tee"][0]
    assert tee.options["sgx_partitioned"] is True and tee.options["cvm_factor"] == 1.0


def test_duplicate_backends_get_a_note():
    from suite.config import RunConfig
    from suite.planning import merged_entries, plan_backends

    assert merged_entries(plan_backends(RunConfig(backends=["plaintext", "null"]))) == []
    notes = merged_entries(plan_backends(RunConfig(backends=["null", "plaintext", "null"])))
    assert notes == ["configuration null is asked for by 2 entries of the backend list; it runs once"]


def test_compare_keeps_brackets_of_configuration_names():
    import pandas as pd
    from rich.console import Console

    from suite.compare import print_comparison

    df = pd.DataFrame({"backend_id": ["dp[target_epsilon=1.0]", "mpc"], "metric": ["auroc"] * 2,
                       "a": [0.7, 0.8], "b": [0.71, 0.8], "b_minus_a": [0.01, 0],
                       "ratio_b_over_a": [1.01, 1]})
    buf = io.StringIO()
    print_comparison(df, Console(file=buf, width=200))
    assert "dp[target_epsilon=1.0]" in buf.getvalue()


def test_run_help_states_the_default_backends():
    from suite.cli import build_parser
    from suite.config import DEFAULT_BACKENDS, RunConfig

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    assert "default: " + ",".join(DEFAULT_BACKENDS) in text
    assert list(DEFAULT_BACKENDS) == RunConfig().backends
    assert f"(default {RunConfig().timeout_s:g})" in text


# ---------------------------------------------------------------- --model files

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from suite.models import random_small_densenet, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(random_small_densenet(["Effusion"], resolution=32, seed=0), path)
    return path


def test_truncated_checkpoint_is_named_corrupt(checkpoint, tmp_path, capsys):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    one_line_error(capsys, ["run", "--config", TINY, "--model", str(bad), "--out", str(tmp_path / "r")],
                   f"model checkpoint {bad} is corrupt or truncated")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,needle", [(b"epochs = 3\n", "is a text file, not a checkpoint"),
                                            (b"", "is empty (0 bytes)"),
                                            (b"\x00\x01garbage", "is not a PyTorch file")])
def test_non_checkpoint_model_file(tmp_path, capsys, content, needle):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    one_line_error(capsys, ["run", "--config", TINY, "--model", str(bad), "--out", str(tmp_path / "r")],
                   needle)


def test_good_checkpoint_passes_the_file_check(checkpoint):
    from suite.runner import check_checkpoint_file

    check_checkpoint_file(str(checkpoint))   # no error


def test_checkpoint_resolution_is_checked_against_the_data(checkpoint, tiny_data):
    from suite.errors import SuiteError
    from suite.models import load_checkpoint
    from suite.runner import check_model_resolution

    bundle = load_checkpoint(checkpoint)
    check_model_resolution(bundle, tiny_data)                # 32 px model, 32 px data
    bundle.resolution = 64                                    # positive control: a mismatch
    with pytest.raises(SuiteError, match="expects 64 px images but the dataset is 32 px"):
        check_model_resolution(bundle, tiny_data)


# ---------------------------------------------------------------- --out

def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("precious")
    one_line_error(capsys, ["run", "--config", TINY, "--out", str(f)], "is an existing file, not a folder")
    assert f.read_text() == "precious"


def test_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("precious")
    one_line_error(capsys, ["run", "--config", TINY, "--out", str(f / "run")], "afile is a file")


def test_out_in_a_locked_folder(tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        one_line_error(capsys, ["run", "--config", TINY, "--out", str(locked / "run")],
                       "is not writable", "no write permission")
    finally:
        locked.chmod(0o700)


def test_early_error_leaves_no_run_folder(tmp_path, capsys):
    one_line_error(capsys, ["run", "--config", TINY, "--dataset", "synthtic", "--out", str(tmp_path / "r")],
                   "unknown dataset")
    assert not (tmp_path / "r").exists()


def test_out_where_nothing_can_be_created(capsys):
    """Even root cannot create folders in /proc: refused before any work, in one line."""
    one_line_error(capsys, ["run", "--config", TINY, "--out", "/proc/suite-run"],
                   "output folder /proc/suite-run is not writable")


def test_ctrl_c_hint_names_the_actual_run_folder(tmp_path, capsys, monkeypatch):
    """Interrupted after run.json is written: the hint is a command to copy, not `RUN_DIR`."""
    import suite.runner

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite.runner, "run_pending", interrupted)
    out = tmp_path / "my run"
    rc = main(["run", "--config", TINY, "--model", "small-densenet-untrained", "--out", str(out),
               "--backends", "null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == (f"interrupted (SIGINT): results written so far are kept; "
                                     f"continue with python -m suite run --resume '{out}'"), err
    assert (out / "run.json").exists()


def test_ctrl_c_before_anything_is_written_leaves_nothing(tmp_path, capsys, monkeypatch):
    import suite.runner

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite.runner, "load_dataset", interrupted)
    rc = main(["run", "--config", TINY, "--out", str(tmp_path / "r"), "--backends", "null"])
    assert rc == 130 and "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
