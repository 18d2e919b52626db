"""`suite compare RUN_A RUN_B`: what changed between two runs, per backend configuration."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from suite.results import ALL, MACRO, NONE, read_results
from suite.run_folder import RunFolder

KEY_METRICS = (("auroc", MACRO), ("max_abs_diff", ALL), ("latency_per_image_p50", NONE),
               ("bytes_per_image", NONE), ("peak_rss", NONE))


def compare_runs(a: Path, b: Path) -> pd.DataFrame:
    """Rows backend_id x metric with value in A, value in B, and B - A."""
    frames = []
    for tag, path in (("a", a), ("b", b)):
        df = read_results(RunFolder(path).results)
        df = df[(df["site"] == ALL) & (df["status"] == "ok")]
        keep = pd.Series(False, index=df.index)
        for metric, label in KEY_METRICS:
            keep |= (df["metric"] == metric) & (df["label"] == label)
        frames.append(df[keep].set_index(["backend_id", "metric"])["value"].rename(tag))
    out = pd.concat(frames, axis=1).reset_index()
    out["b_minus_a"] = out["b"] - out["a"]
    out["ratio_b_over_a"] = out["b"] / out["a"]
    return out


def print_comparison(df: pd.DataFrame, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="run comparison (B vs A)")
    for col in ("backend_id", "metric", "a", "b", "b_minus_a", "ratio_b_over_a"):
        table.add_column(col)
    for _, r in df.iterrows():
        # configuration names hold brackets (dp[target_epsilon=1.0]): not rich markup
        table.add_row(escape(str(r.backend_id)), escape(str(r.metric)), *[_fmt(r[c]) for c in
                                                         ("a", "b", "b_minus_a", "ratio_b_over_a")])
    console.print(table)


def _fmt(v) -> str:
    return "-" if pd.isna(v) else f"{v:.4g}"
