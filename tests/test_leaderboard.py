"""Leaderboard tables from the committed example run (tests/data/example_run)."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from suite.leaderboard import (
    LEADERBOARD_COLUMNS, build_leaderboard, format_bytes, format_ci, format_seconds, per_label_table,
    per_site_table, print_leaderboard, projected_latencies, write_leaderboard,
)
from suite.results import ALL, MACRO, NONE, read_results

EXAMPLE = Path(__file__).parent / "data" / "example_run"
ORDER = ["plaintext", "mpc", "tee", "he", "dp[target_epsilon=3.0]", "dp[target_epsilon=inf]", "fl"]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "example_run"
    shutil.copytree(EXAMPLE, dst)
    return dst


@pytest.fixture()
def results() -> pd.DataFrame:
    return read_results(EXAMPLE / "results.jsonl")


@pytest.fixture()
def run_meta() -> dict:
    return json.loads((EXAMPLE / "run.json").read_text())


def _row(results: pd.DataFrame, bid: str, metric: str, site: str, label: str) -> pd.Series:
    hit = results[(results.backend_id == bid) & (results.metric == metric) & (results.site == site)
                  & (results.label == label)]
    assert len(hit) == 1, (bid, metric, site, label)
    return hit.iloc[0]


def test_fixture_is_small():
    assert sum(p.stat().st_size for p in EXAMPLE.iterdir()) < 250_000


def test_one_row_per_backend_in_run_order(results, run_meta):
    board = build_leaderboard(results, run_meta)
    assert list(board.columns) == LEADERBOARD_COLUMNS
    # run.json is written with sorted keys; results.jsonl keeps the order backends ran in
    assert list(board.backend_id) == ORDER


def test_values_read_back_from_rows(results, run_meta):
    board = build_leaderboard(results, run_meta).set_index("backend_id")
    for bid in ("plaintext", "mpc", "tee"):
        auc = _row(results, bid, "auroc", ALL, MACRO)
        assert board.at[bid, "auroc_macro"] == auc.value
        assert board.at[bid, "auroc_macro_ci_low"] == auc.ci_low
        assert board.at[bid, "auroc_macro_ci_high"] == auc.ci_high
        assert board.at[bid, "latency_per_image_p50"] == _row(results, bid, "latency_per_image_p50", ALL, NONE).value
        assert board.at[bid, "bytes_per_image"] == _row(results, bid, "bytes_per_image", ALL, NONE).value
        assert board.at[bid, "n_images"] == 60
        assert board.at[bid, "status"] == "ok"
    mpc = board.loc["mpc"]
    delta = _row(results, "mpc", "auroc_delta", ALL, MACRO)
    assert (mpc.delta_auroc_macro, mpc.delta_ci_low, mpc.delta_ci_high) == (delta.value, delta.ci_low, delta.ci_high)
    ps = results[(results.backend_id == "mpc") & (results.metric == "delong_p") & (results.site == ALL)]
    assert mpc.min_delong_p == ps.value.min()
    assert mpc.max_abs_diff == _row(results, "mpc", "max_abs_diff", ALL, ALL).value
    assert mpc.reference == "plaintext"
    assert mpc.protects == "input_images, model_weights"
    assert mpc.track == "inference"
    # the reference compares with nothing
    plain = board.loc["plaintext"]
    assert math.isnan(plain.delta_auroc_macro) and math.isnan(plain.min_delong_p)
    assert plain.protects == "" and plain.track == "reference"
    assert math.isnan(plain.fit_time)           # inference only: no training step


def test_failed_and_simulated_backends(results, run_meta):
    board = build_leaderboard(results, run_meta).set_index("backend_id")
    he = board.loc["he"]
    assert he.status == "failed"
    assert "MemoryError" in he.error
    assert math.isnan(he.auroc_macro) and math.isnan(he.latency_per_image_p50)
    assert bool(board.loc["tee"].simulated)
    assert not board.loc["mpc"].simulated


def test_build_without_run_meta_uses_rows(results):
    board = build_leaderboard(results, {})
    assert list(board.backend_id) == ORDER
    he = board.set_index("backend_id").loc["he"]
    assert he.status == "failed" and "MemoryError" in he.error
    assert board.set_index("backend_id").loc["tee"].guarantee == "enclave isolation (simulated)"


def test_empty_results():
    board = build_leaderboard(read_results(Path("/nonexistent/results.jsonl")), {})
    assert board.empty and list(board.columns) == LEADERBOARD_COLUMNS


def test_per_label_table(results):
    pl = per_label_table(results)
    assert set(pl.backend_id) == {"plaintext", "mpc", "tee", "dp[target_epsilon=3.0]", "dp[target_epsilon=inf]", "fl"}
    assert list(pl[pl.backend_id == "mpc"].label) == ["Atelectasis", "Cardiomegaly", "Effusion", MACRO]
    row = pl[(pl.backend_id == "mpc") & (pl.label == "Effusion")].iloc[0]
    src = _row(results, "mpc", "auroc", ALL, "Effusion")
    assert (row.auroc, row.ci_low, row.ci_high) == (src.value, src.ci_low, src.ci_high)
    assert row.delong_p == _row(results, "mpc", "delong_p", ALL, "Effusion").value


def test_per_site_table(results):
    ps = per_site_table(results)
    assert list(ps[ps.backend_id == "tee"].site) == ["site_a", "site_b", ALL]
    row = ps[(ps.backend_id == "tee") & (ps.site == "site_b")].iloc[0]
    src = _row(results, "tee", "auroc", "site_b", MACRO)
    assert (row.auroc_macro, row.auroc_macro_ci_low, row.auroc_macro_ci_high) == (src.value, src.ci_low, src.ci_high)
    assert row["auroc_Cardiomegaly"] == _row(results, "tee", "auroc", "site_b", "Cardiomegaly").value
    assert not math.isnan(row["auroc_Cardiomegaly_ci_low"])


def test_write_leaderboard_files(run_dir):
    board = write_leaderboard(run_dir)
    csv = pd.read_csv(run_dir / "leaderboard.csv")
    assert list(csv.columns) == LEADERBOARD_COLUMNS
    assert list(csv.backend_id) == list(board.backend_id)
    assert csv.set_index("backend_id").at["mpc", "auroc_macro"] == pytest.approx(board.set_index("backend_id").at["mpc", "auroc_macro"])

    md = (run_dir / "leaderboard.md").read_text()
    mpc = board.set_index("backend_id").loc["mpc"]
    assert format_ci(mpc.auroc_macro, mpc.auroc_macro_ci_low, mpc.auroc_macro_ci_high) in md
    assert "[0." in md and "95% CI" in md
    assert "tee *(simulated)*" in md
    assert "mpc *(simulated)*" not in md
    assert "**FAILED**" in md and "MemoryError" in md
    assert "460 MB" in md and "2.35 s" in md and "11 ms" in md
    # one threat-model footnote per distinct threat model, keyed from the tables
    for bid in board.backend_id:
        assert re.search(rf"\[\^\d+\]: \*\*[^*]*{re.escape(bid)}[^*]*\*\* — protects", md), bid
    assert "protected scope: classifier head only" in md
    # the guarantee text is a footnote, never a table column
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert not any("2PC secret sharing" in ln for ln in tables)
    assert "## Inference track" in md and "## Training track" in md
    training = md.split("## Training track")[1].split("##")[0]
    assert "2.97 (δ=1.0e-05)" in training and "41 s" in training and "×3.3" in training
    assert "dp[target_epsilon=3.0]" in training and "mpc" not in training
    inference = md.split("## Inference track")[1].split("##")[0]
    assert "dp[" not in inference and "×214" in inference
    assert "Per-label AUROC" in md and "Per-site macro AUROC" in md
    assert "| site_b |" in md


def test_formatting():
    assert format_ci(0.8421, 0.8012, 0.88) == "0.842 [0.801, 0.880]"
    assert format_ci(0.84, float("nan"), 0.9) == "0.840"
    assert format_ci(float("nan")) == "–"
    assert format_ci(-0.0012, -0.004, 0.002, signed=True) == "-0.001 [-0.004, +0.002]"
    assert format_bytes(0) == "0 B" and format_bytes(2100) == "2.1 KB"
    assert format_bytes(4.6e8) == "460 MB" and format_bytes(5.2e9) == "5.2 GB"
    assert format_seconds(2.5e-5) == "25 µs" and format_seconds(0.011) == "11 ms"
    assert format_seconds(38) == "38 s" and format_seconds(600) == "10 min" and format_seconds(36000) == "10 h"


def _printed(board, width=200, wide=False, columns=None, monkeypatch=None, **kw) -> str:
    from rich.console import Console

    if monkeypatch is not None:
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", str(columns))
    buf = io.StringIO()
    print_leaderboard(board, Console(file=buf, width=width, color_system=None), wide=wide, **kw)
    return buf.getvalue()


def test_print_leaderboard_wide(results, run_meta, monkeypatch):
    out = _printed(build_leaderboard(results, run_meta), wide=True, monkeypatch=monkeypatch)
    assert "0.912 [0.866, 0.959]" in out or "0.912 [" in out
    assert "FAILED" in out and "MemoryError" in out
    assert "tee (sim)" in out
    assert "2PC" in out and "guarantee" in out               # --wide keeps the guarantee column


@pytest.mark.parametrize("columns", [100, 80])
def test_terminal_table_fits_columns(results, run_meta, monkeypatch, columns):
    """A pipe or a terminal of COLUMNS=100 gets no line wider than 100 (the CLI's console is
    200 wide on a pipe): guarantees become footnote keys below the tables."""
    board = build_leaderboard(results, run_meta)
    out = _printed(board, width=200, columns=columns, monkeypatch=monkeypatch, results=results, run_meta=run_meta)
    widths = [len(line) for line in out.splitlines()]
    assert max(widths) <= columns, max(widths)
    assert "Inference track" in out and "Training track" in out
    assert "[2] protects input_images, model_weights from the other party" in out
    if columns >= 100:
        assert "mpc [2]" in out and "tee (sim) [3]" in out
    assert "×214" in out and "2.97" in out and "FAILED" in out and "MemoryError" in out
    # positive control: the wide table at the same COLUMNS does overflow
    wide = _printed(board, width=200, wide=True, columns=columns, monkeypatch=monkeypatch)
    assert max(len(line) for line in wide.splitlines()) > columns


def test_terminal_width_without_columns_on_a_pipe(results, run_meta, monkeypatch):
    out = _printed(build_leaderboard(results, run_meta), width=200, monkeypatch=monkeypatch)
    assert max(len(line) for line in out.splitlines()) <= 100


def test_projected_latency_in_both_row_forms(results, run_meta):
    """Schema 2 (metric + network column) and the older name suffix read the same way."""
    mpc = {p["network"]: p["value"] for p in projected_latencies(results, "mpc")}
    assert mpc == {"lan": 2.9, "wan": 63.0}
    tee = {p["network"]: p["value"] for p in projected_latencies(results, "tee")}
    assert tee == {"sgx": 0.021}
    old = results.copy()
    hit = (old.backend_id == "mpc") & (old.metric == "projected_latency_per_image")
    old.loc[hit, "metric"] = "projected_latency_per_image_" + old.loc[hit, "network"]
    old.loc[hit, "network"] = None
    assert {p["network"]: p["value"] for p in projected_latencies(old, "mpc")} == mpc
    board = build_leaderboard(old, run_meta).set_index("backend_id")
    assert board.at["mpc", "projected_latency_wan"] == 63.0


def test_training_and_cpu_columns(results, run_meta):
    board = build_leaderboard(results, run_meta).set_index("backend_id")
    dp = board.loc["dp[target_epsilon=3.0]"]
    assert dp.track == "training" and dp.technique == "dp"
    assert (dp.epsilon, dp.dp_delta, dp.mia_auroc, dp.fit_time) == (2.97, 1e-5, 0.51, 41.0)
    assert dp.reference == "dp[target_epsilon=inf]"
    # MPC: the parties' measured CPU seconds, summed; others: their one process's latency
    assert board.at["mpc", "cpu_per_image"] == pytest.approx(1.9 + 1.7)
    assert "2 parties" in board.at["mpc", "cpu_source"]
    assert board.at["tee", "cpu_per_image"] == 0.015 and "wall-clock" in board.at["tee", "cpu_source"]
    assert math.isnan(board.at["he", "cpu_per_image"])


def _with_rows(results: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    base = {"site": ALL, "label": NONE, "status": "ok", "dataset": "example-cxr", "track": "training"}
    return pd.concat([results, pd.DataFrame([{**base, **r} for r in rows])], ignore_index=True)


def test_training_rows_lead_with_cost_and_guarantee(results, run_meta):
    """Training rows: time, its ratio to the control, bytes, ε (δ, level), rounds; no max|Δp|
    against another model."""
    dp = "dp[target_epsilon=3.0]"
    extra = _with_rows(results, [
        {"backend": "dp", "backend_id": dp, "metric": "n_train_private", "value": 1680, "unit": "patients"},
        {"backend": "dp", "backend_id": dp, "metric": "fit_time_ratio", "value": 1.25, "unit": "x",
         "reference": "dp[target_epsilon=inf]"},
        {"backend": "fl", "backend_id": "fl", "metric": "training_rounds", "value": 12, "unit": "rounds"},
        {"backend": "fl", "backend_id": "fl", "metric": "epsilon", "value": 40.0, "unit": "epsilon"},
        {"backend": "fl", "backend_id": "fl", "metric": "epsilon", "value": 9.0, "unit": "epsilon", "round": 1},
    ])
    meta = json.loads(json.dumps(run_meta))
    meta["backends"]["fl"]["threat_model"].update(
        guarantee_kind="differential_privacy", guarantee="site-level local DP of every update")
    board = build_leaderboard(extra, meta).set_index("backend_id")
    assert board.at[dp, "fit_time_ratio"] == 1.25              # the harness's row wins
    assert board.at[dp, "privacy_level"] == "patient"
    assert board.at["fl", "privacy_level"] == "site"
    assert board.at["fl", "training_rounds"] == 12
    assert board.at["fl", "epsilon"] == 40.0                    # the total, not round 1's
    assert math.isnan(board.at["dp[target_epsilon=inf]", "fit_time_ratio"])   # the control itself
    assert math.isnan(board.at["dp[target_epsilon=inf]", "privacy_level"])    # no DP guarantee
    assert board.loc[board.track == "training", "max_abs_diff"].isna().all()
    assert board.loc[board.track != "training", "max_abs_diff"].notna().any()
    # without the harness's row the ratio is the two fit times
    plain = build_leaderboard(results, run_meta).set_index("backend_id")
    assert plain.at[dp, "fit_time_ratio"] == pytest.approx(41.0 / plain.at["dp[target_epsilon=inf]", "fit_time"])


def test_markdown_training_columns_and_width(run_dir, results, run_meta):
    dp = "dp[target_epsilon=3.0]"
    extra = _with_rows(results, [
        {"backend": "dp", "backend_id": dp, "metric": "n_train_private", "value": 1680, "unit": "patients"}])
    extra.to_json(run_dir / "results.jsonl", orient="records", lines=True)
    write_leaderboard(run_dir)
    md = (run_dir / "leaderboard.md").read_text(encoding="utf-8")
    training = md.split("## Training track")[1].split("##")[0]
    header = next(ln for ln in training.splitlines() if ln.startswith("| backend"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:6] == ["backend", "time", "× ctrl", "comm", "ε (δ, level)", "rounds"]
    assert "2.97 (δ=1.0e-05, patient)" in training
    # prose and footnotes wrap at 100 characters; footnote continuations stay indented
    prose = [ln for ln in md.splitlines() if not ln.startswith("|")]
    assert max(map(len, prose)) <= 100
    assert any(ln.startswith("    ") for ln in md.split("## Threat models")[1].splitlines())
