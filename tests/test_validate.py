"""Validate mode (`suite run --split all`): a model trained elsewhere is scored on every image;
each refusal (default model, overlapping checkpoint, bad TOML value) has its test."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from suite.cli import main
from suite.config import load_config
from suite.data.catalog import load_dataset
from suite.errors import SuiteError
from tests.conftest import REPO, run_cli, run_main

TINY = str(REPO / "tests" / "tiny.toml")
UNTRAINED = "small-densenet-untrained"   # saw no images at all: trained "elsewhere" trivially


def one_line_error(proc, *needles):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def validate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "r"
    proc = run_cli("run", "--config", TINY, "--backends", "plaintext,null,dp", "--model", UNTRAINED,
                   "--split", "all", "--out", str(out), "--no-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_split_all_scores_every_image_and_keeps_sites(validate_run):
    cfg = load_config(TINY)
    whole, _ = load_dataset(cfg.dataset, cfg.seed)        # the train-test set, every image of it
    state = json.loads((validate_run / "run.json").read_text())
    assert state["dataset"]["split"] == "all" and state["config"]["dataset"]["split"] == "all"
    assert state["dataset"]["n_test"] == len(whole) and state["dataset"]["n_train"] == 0
    preds = pd.read_parquet(validate_run / "predictions.parquet")
    scored = preds[preds.backend_id == "plaintext"]
    assert set(scored.image_id) == set(whole.image_ids.astype(str))
    assert set(scored.site) == set(whole.sites.astype(str)) and len(set(scored.site)) == 7


def test_split_all_skips_training_rows_with_a_reason(validate_run):
    backends = json.loads((validate_run / "run.json").read_text())["backends"]
    training = {b: s for b, s in backends.items() if s["track"] == "training"}
    assert training, "dp should have planned training configurations"
    for entry in training.values():
        assert entry["status"] == "skipped" and "--split all" in entry["error"]
    assert backends["plaintext"]["status"] == "ok" and backends["null"]["status"] == "ok"


def test_split_all_refuses_the_default_model(tmp_path):
    proc = run_main("run", "--config", TINY, "--split", "all", "--out", str(tmp_path / "r"))
    one_line_error(proc, "--split all", "--model")
    assert not (tmp_path / "r").exists()


def test_split_all_refuses_a_checkpoint_trained_on_these_images(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    proc = run_cli("train", "--config", TINY, "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # positive control: the same checkpoint is accepted by a train-test run (it saw only train)
    ok = run_cli("run", "--config", TINY, "--backends", "null", "--model", str(ckpt),
                 "--out", str(tmp_path / "ok"), "--no-report")
    assert ok.returncode == 0, ok.stderr[-2000:]
    proc = run_main("run", "--config", TINY, "--backends", "null", "--model", str(ckpt),
                    "--split", "all", "--out", str(tmp_path / "r"))
    one_line_error(proc, "trained on", "test images")


def test_toml_split_is_validated(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[dataset]\nsplit = "all"\n')
    assert load_config(good).dataset.split == "all"
    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset]\nsplit = "everything"\n')
    with pytest.raises(SuiteError, match="split must be one of train-test, all"):
        load_config(bad)


def test_resume_keeps_the_split(validate_run, capsys):
    rc = main(["run", "--resume", str(validate_run), "--split", "train-test", "--no-report"])
    err = capsys.readouterr().err
    assert rc == 2 and "split" in err and "contradicts the saved run" in err, err
    assert main(["run", "--resume", str(validate_run), "--no-report"]) == 0
    state = json.loads((validate_run / "run.json").read_text())
    assert state["dataset"]["split"] == "all" and state["config"]["dataset"]["split"] == "all"
