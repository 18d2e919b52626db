"""`suite compare A B` writes a page of what changed, with significance where it applies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from suite.report.compare_page import compare_table, write_compare_page

EXAMPLE = Path(__file__).parent / "data" / "example_run"


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(EXAMPLE, a)
    shutil.copytree(EXAMPLE, b)
    return a, b


def _degrade(run: Path, bid: str, noise: float, latency_factor: float) -> None:
    """B's `bid` scores the same images with noisier probabilities and runs slower."""
    preds = pd.read_parquet(run / "predictions.parquet")
    hit = preds.backend_id == bid
    rng = np.random.default_rng(3)
    preds.loc[hit, "prob"] = np.clip(preds.loc[hit, "prob"] + rng.normal(0, noise, hit.sum()), 0, 1)
    preds.to_parquet(run / "predictions.parquet", index=False)
    lines = []
    for line in (run / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["backend_id"] == bid and row["metric"] == "latency_per_image_p50":
            row["value"] *= latency_factor
        lines.append(json.dumps(row))
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_identical_runs_change_nothing(runs):
    df = compare_table(*runs).set_index("backend_id")
    mpc = df.loc["mpc"]
    assert mpc.change == 0 and not mpc.significant
    assert "paired bootstrap over 60 shared images" in mpc.test
    assert mpc.latency_ratio == 1 and mpc.bytes_ratio == 1
    assert math.isnan(df.loc["he"].change) and df.loc["he"].status_b == "failed"


def test_a_degraded_configuration_is_flagged(runs):
    """Positive control: heavy noise on mpc's probabilities in B is a significant AUROC drop."""
    a, b = runs
    _degrade(b, "mpc", noise=0.6, latency_factor=3.0)
    df = compare_table(a, b).set_index("backend_id")
    mpc = df.loc["mpc"]
    assert mpc.change < 0 and mpc.change_high < 0 and mpc.significant
    assert mpc.latency_ratio == pytest.approx(3.0)
    assert df.loc["tee"].significant in (False, np.False_)
    page = write_compare_page(a, b)
    assert page == b / "compare.html"
    html = page.read_text(encoding="utf-8")
    row = next(r for r in html.split("<tr") if "<td class=\"\">mpc</td>" in r)
    assert 'class="sig"' in row and "significant" in row and "×3" in row


def test_unpaired_runs_use_the_ci_test(runs):
    a, b = runs
    (b / "predictions.parquet").unlink()
    df = compare_table(a, b).set_index("backend_id")
    assert "z-test" in df.loc["mpc"].test and df.loc["mpc"].p == 1.0
    assert write_compare_page(a, b).exists()
