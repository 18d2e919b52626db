"""The runner's scoring of a finished training configuration (suite/runner.py score_part):
each fact once. `fit_time_ratio` was once written twice for every training row (two helpers,
units "ratio" and "x")."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from rich.console import Console

from suite.config import RunConfig
from suite.harness import part_paths
from suite.planning import Planned
from suite.results import ResultWriter, read_results
from suite.run_folder import RunFolder
from suite.runner import RunState, score_part

LABELS = ["Cardiomegaly", "Effusion"]


def _write_part(run_dir, backend_id: str, fit_s: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = 24
    y = rng.integers(0, 2, size=(n, len(LABELS)))
    preds = pd.DataFrame({
        "backend_id": backend_id, "backend": "dp", "dataset": "synthetic",
        "image_id": np.repeat([f"img{i}" for i in range(n)], len(LABELS)),
        "site": np.repeat([f"site{i % 2}" for i in range(n)], len(LABELS)),
        "label": np.tile(LABELS, n), "y_true": y.reshape(-1).astype(float),
        "prob": np.clip(y.reshape(-1) * 0.6 + rng.random(n * len(LABELS)) * 0.4, 0, 1)})
    meta_path, pred_path = part_paths(run_dir, backend_id)
    preds.to_parquet(pred_path)
    part = {"backend_id": backend_id, "status": "ok", "n_images": n, "batch_size": 8, "traffic": [],
            "timings": {"setup_s": 0.1, "fit_s": fit_s, "batch_seconds": [0.01] * 3, "batch_sizes": [8] * 3}}
    meta_path.write_text(json.dumps(part))
    return part


def test_a_training_row_has_one_fit_time_ratio(tmp_path):
    run_dir = tmp_path / "run"
    control, row = "dp[target_epsilon=inf]", "dp[target_epsilon=1.0]"
    _write_part(run_dir, control, fit_s=2.0, seed=0)
    part = _write_part(run_dir, row, fit_s=3.0, seed=1)
    entry = {"backend": "dp", "track": "training", "status": "ok", "threat_model": None}
    state = RunState(RunFolder(run_dir).run_json, {
        "run_id": "t", "git_sha": None, "config_hash": "h", "seed": 0, "suite_version": "t",
        "dataset": {"name": "synthetic", "label_names": LABELS},
        "backends": {control: dict(entry), row: dict(entry, status="running")}})
    writer = ResultWriter(RunFolder(run_dir).results)
    plan = Planned(row, "dp", "training", {}, control, None)
    score_part(plan, state, run_dir, RunConfig(), part, {"wall_s": 1.0, "peak_rss": 1, "peak_rss_max_process": 1},
               writer, Console(file=io.StringIO()))
    df = read_results(writer.path)
    ratio = df[df.metric == "fit_time_ratio"]
    assert len(ratio) == 1, ratio[["metric", "unit", "value", "note"]]
    assert ratio.value.iloc[0] == 1.5 and ratio.reference.iloc[0] == control
    assert not df.duplicated(["backend_id", "site", "label", "metric", "party", "phase"]).any()
