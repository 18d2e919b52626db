"""`suite compare A B` as a page: what changed between two runs, per configuration.

For each backend configuration in either run: macro AUROC in A and B and its change,
with significance where it can be had; median latency and bytes per image with their
ratio B / A; status changes. Reads the two run folders only (like the report).

Significance of an AUROC change: when both runs scored the same images (same image
ids and labels), a paired bootstrap of the macro AUROC difference over images (the
test set's shared noise cancels); otherwise a z-test from the two runs' own 95% CIs,
taken as independent (conservative when they share images, which is why the paired
test is preferred). Latency and bytes are single medians per run: no test, a ratio.

    write_compare_page(run_a, run_b, out=None) -> path of the page (default B/compare.html)
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from suite.leaderboard import (
    DASH,
    build_leaderboard,
    format_bytes,
    format_ci,
    format_p,
    format_seconds,
    read_run_meta,
)
from suite.results import read_results
from suite.run_folder import RunFolder

N_BOOT = 500          # resamples of the paired test (a significance flag, not a published CI)

__all__ = ["compare_table", "write_compare_page"]


def _predictions(run: Path) -> pd.DataFrame:
    path = RunFolder(run).predictions
    try:
        return pd.read_parquet(path, columns=["backend_id", "image_id", "label", "y_true", "prob"])
    except Exception:  # missing or foreign: the page falls back to the CI test
        return pd.DataFrame(columns=["backend_id", "image_id", "label", "y_true", "prob"])


def paired_change(pa: pd.DataFrame, pb: pd.DataFrame, seed: int = 0) -> tuple[float, float, float, str] | None:
    """(B - A macro AUROC, CI low, CI high, how) by a paired bootstrap, or None when the runs
    did not score the same images with the same labels."""
    from suite.metrics.auroc import bootstrap_paired_macro_delta

    if pa.empty or pb.empty:
        return None
    m = pa.merge(pb, on=["image_id", "label"], suffixes=("_a", "_b"))
    if m.empty or len(m) != len(pa) or len(m) != len(pb):
        return None
    if not np.allclose(m["y_true_a"].fillna(-1), m["y_true_b"].fillna(-1)):
        return None
    how = f"paired bootstrap over {m['image_id'].nunique()} shared images"
    if np.array_equal(m["prob_a"].to_numpy(float), m["prob_b"].to_numpy(float), equal_nan=True):
        return 0.0, 0.0, 0.0, how + " (identical predictions)"
    Y = m.pivot(index="image_id", columns="label", values="y_true_a").to_numpy(float)
    A = m.pivot(index="image_id", columns="label", values="prob_a").to_numpy(float)
    B = m.pivot(index="image_id", columns="label", values="prob_b").to_numpy(float)
    try:
        d, lo, hi = bootstrap_paired_macro_delta(Y, B, A, n_boot=N_BOOT, seed=seed)
    except ValueError:
        return None
    return d, lo, hi, how


def unpaired_change(ra: pd.Series, rb: pd.Series) -> tuple[float, float, float, float] | None:
    """(B - A, CI low, CI high, two-sided p) from each run's own 95% CI, as independent."""
    vals = [ra["auroc_macro"], ra["auroc_macro_ci_low"], ra["auroc_macro_ci_high"],
            rb["auroc_macro"], rb["auroc_macro_ci_low"], rb["auroc_macro_ci_high"]]
    if any(pd.isna(v) for v in vals):
        return None
    a, alo, ahi, b, blo, bhi = (float(v) for v in vals)
    se = math.hypot((ahi - alo) / 3.92, (bhi - blo) / 3.92)
    d = b - a
    if se == 0:
        return d, d, d, 1.0 if d == 0 else 0.0
    return d, d - 1.96 * se, d + 1.96 * se, float(2 * stats.norm.sf(abs(d) / se))


def _ratio(a, b) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return float("nan")
    return b / a if a > 0 and not math.isnan(b) else float("nan")


def compare_table(run_a: Path, run_b: Path) -> pd.DataFrame:
    """One row per configuration of either run (A's order, then B's new ones)."""
    boards, preds = [], []
    for run in (run_a, run_b):
        meta = read_run_meta(run)
        results = read_results(RunFolder(run).results)
        boards.append(build_leaderboard(results, meta).set_index("backend_id"))
        preds.append(_predictions(run))
    order = list(boards[0].index) + [b for b in boards[1].index if b not in boards[0].index]
    rows = []
    for bid in order:
        ra = boards[0].loc[bid] if bid in boards[0].index else None
        rb = boards[1].loc[bid] if bid in boards[1].index else None
        row = {"backend_id": bid, "status_a": ra["status"] if ra is not None else "absent",
               "status_b": rb["status"] if rb is not None else "absent"}
        for tag, r in (("a", ra), ("b", rb)):
            for col in ("auroc_macro", "latency_per_image_p50", "bytes_per_image", "fit_time"):
                row[f"{col}_{tag}"] = float(r[col]) if r is not None and not pd.isna(r[col]) else float("nan")
        row.update(change=float("nan"), change_low=float("nan"), change_high=float("nan"), p=float("nan"),
                   test="", significant=None)
        if ra is not None and rb is not None:
            paired = paired_change(preds[0][preds[0]["backend_id"] == bid].drop(columns="backend_id"),
                                   preds[1][preds[1]["backend_id"] == bid].drop(columns="backend_id"))
            if paired is not None:
                d, lo, hi, how = paired
                row.update(change=d, change_low=lo, change_high=hi, test=how)
            else:
                unp = unpaired_change(ra, rb)
                if unp is not None:
                    d, lo, hi, p = unp
                    row.update(change=d, change_low=lo, change_high=hi, p=p,
                               test="z-test from the two runs' 95% CIs (independent)")
            if not math.isnan(row["change_low"]):
                row["significant"] = bool(row["change_low"] > 0 or row["change_high"] < 0)
        row["latency_ratio"] = _ratio(row["latency_per_image_p50_a"], row["latency_per_image_p50_b"])
        row["bytes_ratio"] = _ratio(row["bytes_per_image_a"], row["bytes_per_image_b"])
        row["fit_ratio"] = _ratio(row["fit_time_a"], row["fit_time_b"])
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_ratio(r: float) -> str:
    return DASH if math.isnan(r) else f"×{r:.3g}"


def _page(df: pd.DataFrame, run_a: Path, run_b: Path) -> str:
    ida = read_run_meta(run_a).get("run_id") or Path(run_a).name
    idb = read_run_meta(run_b).get("run_id") or Path(run_b).name
    e = html.escape
    rows = []
    for _, r in df.iterrows():
        sig = r["significant"] if isinstance(r["significant"], (bool, np.bool_)) else None
        cls = "sig" if sig else ""
        change = DASH if math.isnan(r["change"]) else format_ci(r["change"], r["change_low"], r["change_high"], signed=True)
        verdict = {True: "significant", False: "not significant", None: DASH}[None if sig is None else bool(sig)]
        if not math.isnan(r["p"]):
            verdict += f" (p={format_p(r['p'])})"
        status = r["status_a"] if r["status_a"] == r["status_b"] else f"{r['status_a']} → {r['status_b']}"
        cells = [r["backend_id"], status,
                 format_ci(r["auroc_macro_a"]), format_ci(r["auroc_macro_b"]), change, verdict,
                 format_seconds(r["latency_per_image_p50_a"]), format_seconds(r["latency_per_image_p50_b"]),
                 _fmt_ratio(r["latency_ratio"]),
                 format_bytes(r["bytes_per_image_a"]), format_bytes(r["bytes_per_image_b"]),
                 _fmt_ratio(r["bytes_ratio"]), _fmt_ratio(r["fit_ratio"])]
        tds = "".join(f'<td class="{"num" if i > 1 else ""}">{e(str(c))}</td>' for i, c in enumerate(cells))
        rows.append(f'<tr class="{cls}" title="{e(r["test"])}">{tds}</tr>')
    heads = ["configuration", "status", "AUROC A", "AUROC B", "ΔAUROC B−A [95% CI]", "change",
             "latency A", "latency B", "B / A", "comm/img A", "comm/img B", "B / A", "training B / A"]
    ths = "".join(f'<th class="{"num" if i > 1 else ""}">{h}</th>' for i, h in enumerate(heads))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run comparison {e(ida)} → {e(idb)}</title>
<style>
body {{ font: 13px/1.4 -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d2330; margin: 0; }}
main {{ max-width: 1260px; margin: 0 auto; padding: 10px 16px; }}
h1 {{ font-size: 17px; }} p {{ color: #5b6475; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border-bottom: 1px solid #d9dde5; padding: 3px 6px; text-align: left; }}
th {{ background: #f6f7f9; }} .num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.sig td {{ background: #fff1d6; font-weight: 600; }}
</style></head><body><main>
<h1>What changed: run <code>{e(ida)}</code> (A) → <code>{e(idb)}</code> (B)</h1>
<p>Per configuration: macro AUROC in each run and its change B − A with a 95% CI, highlighted when the CI
excludes 0. The change is a paired bootstrap over images when both runs scored the same images, else a
z-test from each run's own CI (hover a row for which). Latency (median per image), online bytes per image
and training time are single figures per run: their ratio B / A, no test.</p>
<table id="compare-table"><thead><tr>{ths}</tr></thead><tbody>
{"".join(rows) or '<tr><td colspan="13">no configurations in either run</td></tr>'}
</tbody></table>
</main></body></html>
"""


def write_compare_page(run_a: Path, run_b: Path, out: Path | None = None) -> Path:
    """Write the comparison page (default: B's folder / compare.html) and return its path."""
    run_a, run_b = Path(run_a), Path(run_b)
    out = Path(out) if out is not None else run_b / "compare.html"
    df = compare_table(run_a, run_b)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(_page(df, run_a, run_b), encoding="utf-8")
    tmp.replace(out)
    return out
