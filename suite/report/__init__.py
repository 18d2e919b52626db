"""One self-contained HTML report from a run folder.

Reads only run.json, results.jsonl and predictions.parquet, never imports a backend
or torch, and writes `report.html`: inline CSS, a small inline script for sortable
tables, and compact matplotlib figures embedded as inline SVG, so it opens offline.

The first screen answers "which technique, at what price, protecting what from whom"
(summary.py, the cost-utility chart); the track tables follow; everything else is
collapsible detail. Figures live in figures.py.

    render_report(run_dir) -> RunFolder(run_dir).report_html
"""

from __future__ import annotations

import datetime as _dt
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from suite.leaderboard import (
    DASH,
    TRAINING_HEADERS,
    backend_order,
    build_leaderboard,
    format_bytes,
    format_ci,
    format_count,
    format_p,
    format_seconds,
    format_small,
    format_value,
    guarantee_keys,
    per_label_table,
    per_site_table,
    plaintext_latency,
    projected_latencies,
    read_run_meta,
    split_tracks,
    threat_model,
    times_reference,
    training_cells,
    training_sort_keys,
)
from suite.metrics import METRICS
from suite.report import figures
from suite.report.summary import ReportOptions, summary_lines
from suite.results import ALL, MACRO, NONE, read_results
from suite.run_folder import RunFolder
from suite.threat_model import ASSETS

__all__ = ["render_report", "build_context", "ReportOptions"]


def _audit_pictures(run_dir: Path, results) -> list[dict]:
    """Pictures an audit produced (e.g. gradient-inversion reconstructions in `fl`), found
    through the rows that name them (`artifact`), embedded as data URIs so the report stays
    one file."""
    import base64

    if "artifact" not in results.columns:
        return []
    rows = results[results["artifact"].notna() & results["artifact"].astype(str).str.endswith(".png")]
    pictures = []
    for (backend_id, artifact), g in rows.groupby(["backend_id", "artifact"], sort=True):
        png = RunFolder(run_dir).root / str(artifact)
        if not png.exists() or png.stat().st_size > 300_000:
            continue
        view = g["view"].dropna().iloc[0] if "view" in g and g["view"].notna().any() else png.stem
        pictures.append({"backend_id": backend_id, "audit": str(g["metric"].iloc[0]).split("_psnr")[0]
                         .split("_ssim")[0], "view": view,
                         "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()})
    return pictures


# ---------------------------------------------------------------- tables

def _cell(text: Any, sort: Any = None, cls: str = "", badge: str = "", title: str = "") -> dict:
    if sort is None or (isinstance(sort, float) and math.isnan(sort)):
        sort_attr = ""
    else:
        sort_attr = f"{float(sort):.10g}" if isinstance(sort, (int, float, np.floating, np.integer)) else str(sort)
    return {"text": "" if text is None else str(text), "sort": sort_attr, "cls": cls, "badge": badge,
            "title": title}


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _name_cell(r: pd.Series, key: int, tooltip: str) -> dict:
    c = _cell(r["backend_id"], r["backend_id"], "name", "SIMULATED" if r["simulated"] else "", tooltip)
    c["key"] = key
    return c


def _auroc_cells(r: pd.Series) -> list[dict]:
    ok = r["status"] == "ok"
    return [
        _cell(format_ci(r["auroc_macro"], r["auroc_macro_ci_low"], r["auroc_macro_ci_high"]) if ok
              else str(r["status"]).upper(), _f(r["auroc_macro"]), "" if ok else "status-failed"),
        _cell(format_ci(r["delta_auroc_macro"], r["delta_ci_low"], r["delta_ci_high"], signed=True),
              _f(r["delta_auroc_macro"])),
        _cell(format_p(r["min_delong_p"]), _f(r["min_delong_p"])),
    ]


def _track_tables(board: pd.DataFrame, results: pd.DataFrame, run_meta: dict) -> dict:
    """Inference and training tables, each with its own columns; the guarantee is a
    footnote key (and a tooltip), its text in the threat-model section."""
    keys, notes = guarantee_keys(board, results, run_meta)
    plain = plaintext_latency(board)
    inference, training = split_tracks(board)

    def tooltip(r):
        return f"protects {r['protects'] or 'nothing'} from {r['from_whom']}; guarantee: {r['guarantee']}"

    inf_headers = [("configuration", ""), ("macro AUROC [95% CI]", "num"), ("ΔAUROC [95% CI]", "num"),
                   ("min DeLong p", "num"), ("max |Δp|", "num"), ("latency / img", "num"),
                   ("× plain", "num"), ("LAN", "num projected"), ("WAN", "num projected"),
                   ("comm / img", "num"), ("rounds / img", "num"), ("peak RSS", "num"), ("setup", "num")]
    inf_rows = []
    for _, r in inference.iterrows():
        x = _f(r["latency_per_image_p50"]) / plain if plain and plain > 0 else float("nan")
        cells = [_name_cell(r, keys[r["backend_id"]], tooltip(r)), *_auroc_cells(r),
                 _cell(format_small(r["max_abs_diff"]), _f(r["max_abs_diff"])),
                 _cell(format_seconds(r["latency_per_image_p50"]), _f(r["latency_per_image_p50"])),
                 _cell(times_reference(r["latency_per_image_p50"], plain), x),
                 _cell(format_seconds(r["projected_latency_lan"]) if not _nan(r["projected_latency_lan"]) else "",
                       _f(r["projected_latency_lan"]), "projected"),
                 _cell(format_seconds(r["projected_latency_wan"]) if not _nan(r["projected_latency_wan"]) else "",
                       _f(r["projected_latency_wan"]), "projected"),
                 _cell(format_bytes(r["bytes_per_image"]), _f(r["bytes_per_image"])),
                 _cell(format_count(r["rounds_per_image"]), _f(r["rounds_per_image"])),
                 _cell(format_bytes(r["peak_rss"]), _f(r["peak_rss"])),
                 _cell(format_seconds(r["setup_time"]), _f(r["setup_time"]))]
        inf_rows.append({"cells": cells, "simulated": bool(r["simulated"]), "failed": r["status"] != "ok"})
    # columns nobody filled are dropped (a run without MPC has no projected latencies)
    inf_headers, inf_rows = _drop_empty_columns(inf_headers, inf_rows)

    # the columns every training table leads with come from the leaderboard's one definition
    trn_headers = [("configuration", ""), *((h, "num") for h in TRAINING_HEADERS),
                   ("macro AUROC [95% CI]", "num"), ("ΔAUROC [95% CI]", "num"), ("min DeLong p", "num"),
                   ("attack AUROC", "num"), ("peak RSS", "num")]
    trn_rows = []
    for _, r in training.iterrows():
        cells = [_name_cell(r, keys[r["backend_id"]], tooltip(r)),
                 *(_cell(text, sort) for text, sort in zip(training_cells(r), training_sort_keys(r))),
                 *_auroc_cells(r),
                 _cell(format_value(r["mia_auroc"], ""), _f(r["mia_auroc"])),
                 _cell(format_bytes(r["peak_rss"]), _f(r["peak_rss"]))]
        trn_rows.append({"cells": cells, "simulated": bool(r["simulated"]), "failed": r["status"] != "ok"})
    trn_headers, trn_rows = _drop_empty_columns(trn_headers, trn_rows)

    def heads(hs):
        return [{"text": h, "cls": c, "projected": "projected" in c} for h, c in hs]

    owners: dict[int, list[str]] = {}
    for bid, k in keys.items():
        owners.setdefault(k, []).append(bid)
    return {"inference": {"headers": heads(inf_headers), "rows": inf_rows},
            "training": {"headers": heads(trn_headers), "rows": trn_rows},
            "notes": [{"key": k, "text": t, "backends": owners[k]} for k, t in notes]}


BUDGET_METRICS = ("training_budget", "train_budget_epochs")   # dp, fl: the budget row's note says it


def training_budgets(board: pd.DataFrame, results: pd.DataFrame) -> list[dict]:
    """Each training entry's budget, stated once: the note of the budget row its rows
    report, with every row that reports that same budget. Rows of one entry that spent
    different budgets get a line each (so a mismatch shows); rows reporting none are named."""
    _, training = split_tracks(board)
    lines: dict[tuple[str, str], list[str]] = {}
    missing = []
    has_metric = "metric" in results.columns
    for _, r in training.iterrows():
        bid = r["backend_id"]
        hit = results[(results["backend_id"] == bid) & results["metric"].isin(BUDGET_METRICS)] if has_metric else []
        notes = [str(n) for n in (hit["note"].dropna() if len(hit) and "note" in hit else []) if str(n)]
        if notes:
            lines.setdefault((str(r["technique"]), notes[-1]), []).append(bid)
        else:
            missing.append(bid)
    out = [{"technique": t, "text": text, "backends": bids} for (t, text), bids in lines.items()]
    if missing:
        out.append({"technique": "", "text": "no training budget reported", "backends": missing})
    return out


def _drop_empty_columns(headers: list, rows: list[dict]) -> tuple[list, list[dict]]:
    if not rows:
        return headers, rows
    keep = [0] + [j for j in range(1, len(headers))
                  if any(r["cells"][j]["text"] not in ("", DASH) for r in rows)]
    return ([headers[j] for j in keep],
            [{**r, "cells": [r["cells"][j] for j in keep]} for r in rows])


def _threat_matrix(order: list[str], results: pd.DataFrame, run_meta: dict) -> list[dict]:
    out = []
    for bid in order:
        tm = threat_model(bid, results, run_meta)
        protects = set(_list(tm.get("protects")))
        out.append({
            "backend_id": bid, "assets": [a in protects for a in ASSETS],
            "from_whom": tm.get("from_whom") or DASH, "adversary": tm.get("adversary") or DASH,
            "parties": ", ".join(_list(tm.get("parties"))) or DASH,
            "trust": _list(tm.get("trust_assumptions")), "guarantee": tm.get("guarantee") or DASH,
            "guarantee_kind": tm.get("guarantee_kind") or "", "leaks": _list(tm.get("leaks")),
            "scope": tm.get("protected_scope") or DASH, "simulated": bool(tm.get("simulated")),
            "notes": tm.get("notes") or "",
        })
    return out


def _list(v: Any) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in v]
    return [str(v)]


def _nan(v: Any) -> bool:
    return math.isnan(_f(v))


def _site_heatmap(ps: pd.DataFrame, order: list[str]) -> dict:
    """Configuration x site grid of macro AUROC; the colour spans the values seen, so site
    differences show even when every AUROC sits between 0.75 and 0.80."""
    if ps.empty:
        return {"sites": [], "rows": [], "lo": "", "hi": ""}
    sites = [s for s in dict.fromkeys(ps["site"]) if s != ALL] + ([ALL] if (ps["site"] == ALL).any() else [])
    vals = pd.to_numeric(ps["auroc_macro"], errors="coerce")
    lo, hi = (float(vals.min()), float(vals.max())) if vals.notna().any() else (0.5, 1.0)
    grid = ps.drop_duplicates(["backend_id", "site"], keep="last").set_index(["backend_id", "site"])
    rows = []
    for bid in [b for b in order if b in set(ps["backend_id"])]:
        cells = []
        for site in sites:
            if (bid, site) not in grid.index:
                cells.append({"text": DASH, "title": "", "style": ""})
                continue
            g = grid.loc[(bid, site)]
            v = _f(g["auroc_macro"])
            cells.append({"text": DASH if math.isnan(v) else f"{v:.3f}",
                          "title": f"{bid} at {'pooled sites' if site == ALL else site}: "
                                   f"{format_ci(v, g['auroc_macro_ci_low'], g['auroc_macro_ci_high'])}, "
                                   f"n={format_count(g['n'])}",
                          "style": _heat_between(v, lo, hi)})
        rows.append({"backend_id": bid, "cells": cells})
    return {"sites": ["pooled" if s == ALL else s for s in sites], "rows": rows,
            "lo": f"{lo:.3f}", "hi": f"{hi:.3f}"}


def _heat_between(v: float, lo: float, hi: float) -> str:
    if math.isnan(v):
        return ""
    t = 0.5 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    return f"background:hsl({10 + 110 * t:.0f},55%,{86 - 10 * t:.0f}%)"


def _heat(v: float) -> str:
    """Background for an AUROC cell: 0.5 pale red .. 1.0 green."""
    if math.isnan(v):
        return ""
    t = min(1.0, max(0.0, (v - 0.5) / 0.5))
    hue = 10 + 110 * t
    return f"background:hsl({hue:.0f},60%,{88 - 8 * t:.0f}%)"


def _per_site_cells(ps: pd.DataFrame) -> dict:
    labels = [c[len("auroc_"):] for c in ps.columns
              if c.startswith("auroc_") and not c.endswith(("_ci_low", "_ci_high")) and c != "auroc_macro"]
    rows = []
    for _, r in ps.iterrows():
        cells = [{"text": format_ci(r["auroc_macro"], r["auroc_macro_ci_low"], r["auroc_macro_ci_high"]),
                  "sort": _sortable(r["auroc_macro"]), "style": _heat(_f(r["auroc_macro"]))}]
        for lab in labels:
            v = _f(r[f"auroc_{lab}"])
            cells.append({"text": format_ci(v, r[f"auroc_{lab}_ci_low"], r[f"auroc_{lab}_ci_high"]),
                          "sort": _sortable(v), "style": _heat(v)})
        rows.append({"backend_id": r["backend_id"], "site": "pooled" if r["site"] == ALL else r["site"],
                     "pooled": r["site"] == ALL, "n": format_count(r["n"]), "cells": cells})
    return {"labels": labels, "rows": rows}


def _sortable(v: Any) -> str:
    v = _f(v)
    return "" if math.isnan(v) else f"{v:.10g}"


def _per_label_rows(pl: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in pl.iterrows():
        rows.append({
            "backend_id": r["backend_id"], "label": "macro" if r["label"] == MACRO else r["label"],
            "auroc": format_ci(r["auroc"], r["ci_low"], r["ci_high"]), "auroc_sort": _sortable(r["auroc"]),
            "style": _heat(_f(r["auroc"])), "n": format_count(r["n"]), "n_sort": _sortable(r["n"]),
            "delta": format_ci(r["auroc_delta"], r["delta_ci_low"], r["delta_ci_high"], signed=True),
            "delta_sort": _sortable(r["auroc_delta"]), "p": format_p(r["delong_p"]), "p_sort": _sortable(r["delong_p"]),
        })
    return rows


_EXTRA_KEY = ["metric", "site", "label", "party", "phase", "network", "view", "round"]


def _extras(results: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows of metrics outside suite.metrics.METRICS (backend-specific), in run order."""
    known = set(METRICS) | {"status"}
    df = results[~results["metric"].isin(known) & results["metric"].notna()].copy()
    for col in ("party", "phase", "note", "unit", "network", "estimate", "round", "view"):
        if col not in df.columns:
            df[col] = None
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    for col in ("ci_low", "ci_high"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["metric"] = df["metric"].astype(str)
    rank = {b: i for i, b in enumerate(order)}
    df["_rank"] = df["backend_id"].map(rank).fillna(len(rank))
    return df.sort_values(["_rank"], kind="stable").drop(columns="_rank")


def _extras_view(extras: pd.DataFrame, order: list[str]) -> list[dict]:
    """Per backend its extra rows; a note shared by several rows is written once, numbered."""
    out = []
    for bid in order:
        mine = extras[extras["backend_id"] == bid].drop_duplicates(
            [c for c in _EXTRA_KEY + ["network", "round"] if c in extras.columns], keep="last")
        if mine.empty:
            continue
        rows, notes = [], {}
        for _, r in mine.iterrows():
            unit = r["unit"] if isinstance(r["unit"], str) else ""
            ci = ""
            if not (math.isnan(r["ci_low"]) or math.isnan(r["ci_high"])):
                ci = f"[{format_value(r['ci_low'], unit)}, {format_value(r['ci_high'], unit)}]"
            where = ", ".join(f"{k} {r[k]}" for k in ("party", "phase", "network", "round")
                              if k in r.index and _present_text(r[k]))
            estimate = r["estimate"] if "estimate" in r.index and isinstance(r["estimate"], str) else ""
            note = r["note"] if isinstance(r.get("note"), str) else ""
            key = notes.setdefault(note, len(notes) + 1) if note else None
            rows.append({
                "metric": r["metric"] + (f" ({where})" if where else ""),
                "projected": "projected" in r["metric"] or estimate == "projected",
                "simulated": estimate == "simulated",
                "site": "pooled" if r["site"] == ALL else r["site"],
                "label": "" if r["label"] in (NONE, ALL) else ("macro" if r["label"] == MACRO else r["label"]),
                "value": format_value(r["value"], unit), "sort": _sortable(r["value"]), "ci": ci,
                "unit": unit, "note_key": key,
            })
        out.append({"backend_id": bid, "rows": rows, "notes": [(k, n) for n, k in notes.items()]})
    return out


def _present_text(v: Any) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return str(v) != ""


# ---------------------------------------------------------------- main

def _read_predictions(run_dir: Path, notes: list[str]) -> pd.DataFrame:
    cols = ["backend_id", "backend", "dataset", "image_id", "site", "label", "y_true", "prob"]
    path = RunFolder(run_dir).predictions
    if not path.exists():
        notes.append("predictions.parquet is missing: no ROC curves or agreement plots.")
        return pd.DataFrame(columns=cols)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # a torn or foreign file must not stop the report
        notes.append(f"predictions.parquet could not be read ({type(exc).__name__}: {exc}).")
        return pd.DataFrame(columns=cols)
    for col in cols:
        if col not in df.columns:
            df[col] = np.nan
    df["y_true"] = pd.to_numeric(df["y_true"], errors="coerce")
    df["prob"] = pd.to_numeric(df["prob"], errors="coerce")
    return df


def build_context(run_dir: Path, options: ReportOptions | None = None) -> dict:
    """Everything the template shows, computed from the run folder's files only."""
    run_dir = Path(run_dir)
    options = options or ReportOptions()
    notes: list[str] = []
    run_meta = read_run_meta(run_dir)
    if not run_meta:
        notes.append("run.json is missing or unreadable: metadata comes from results.jsonl only.")
    results = read_results(RunFolder(run_dir).results)
    if results.empty:
        notes.append("results.jsonl has no rows.")
    for col in ("metric", "site", "label", "backend_id"):
        results[col] = results[col].astype(object)
    preds = _read_predictions(run_dir, notes)

    order = backend_order(results, run_meta)
    order += [b for b in dict.fromkeys(preds["backend_id"].dropna().astype(str)) if b not in order]
    colors = figures.technique_colors(order)
    board = build_leaderboard(results, run_meta)
    extras = _extras(results, order)
    projected = {b: projected_latencies(results, b) for b in order}
    references = {r["backend_id"]: r["reference"] for _, r in board.iterrows() if isinstance(r["reference"], str)}
    baseline = next((b for b in order if b == "plaintext"), None)

    agreement = []
    for _, r in board.iterrows():
        ref = r["reference"]
        if not isinstance(ref, str) or not ref or ref == r["backend_id"]:
            continue
        if r["status"] != "ok":
            agreement.append({"backend_id": r["backend_id"], "reference": ref, "svg": None,
                              "why": f"{r['backend_id']} did not finish ({r['status']})", "stats": []})
            continue
        svg, why = figures.agreement_figure(preds, r["backend_id"], ref, colors.get(r["backend_id"], "#333"))
        stats = []
        for metric in ("max_abs_diff", "mean_abs_diff", "ba_bias", "ba_loa_low", "ba_loa_high", "ks_stat",
                       "wasserstein", "decision_agreement"):
            hit = results[(results["backend_id"] == r["backend_id"]) & (results["metric"] == metric)
                          & (results["site"] == ALL) & (results["label"] == ALL)]
            if len(hit):
                stats.append((metric, format_value(_f(hit["value"].iloc[-1]), METRICS[metric].unit)))
        agreement.append({"backend_id": r["backend_id"], "reference": ref, "svg": svg, "why": why, "stats": stats})

    ps = per_site_table(results, order)
    pl = per_label_table(results, order)
    failed = [{"backend_id": r["backend_id"], "status": r["status"],
               "error": r["error"] if isinstance(r["error"], str) else "no error recorded"}
              for _, r in board.iterrows() if r["status"] != "ok"]

    model = run_meta.get("model") or {}
    ds = run_meta.get("dataset") or {}
    backend_meta = []
    for b in order:
        meta = (run_meta.get("backends") or {}).get(b) or {}
        if meta.get("versions") or meta.get("options"):
            backend_meta.append({"backend_id": b, "versions": meta.get("versions") or {},
                                 "options": meta.get("options") or {}})
    first = results.iloc[0] if len(results) else pd.Series(dtype=object)
    shown = board[~((board["track"] == "reference") & (board["technique"] != "plaintext"))]
    return {
        "run_id": run_meta.get("run_id") or first.get("run_id") or run_dir.name,
        "started_at": run_meta.get("started_at"), "finished_at": run_meta.get("finished_at"),
        "git_sha": run_meta.get("git_sha") or first.get("git_sha"),
        "suite_version": run_meta.get("suite_version") or first.get("suite_version"),
        "seed": run_meta.get("seed", first.get("seed")),
        "config_hash": run_meta.get("config_hash") or first.get("config_hash"),
        "dataset": ds,
        "dataset_name": ds.get("name") or (first.get("dataset") if len(results) else None),
        "model": model, "versions": run_meta.get("versions") or {},
        "backend_meta": backend_meta,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": notes, "options": options, "prices": options.describe(),
        "n_backends": len(board), "n_ok": int((board["status"] == "ok").sum()) if len(board) else 0,
        "summary": summary_lines(shown, options) if len(shown) else [],
        "cost_utility_svg": figures.cost_utility_figure(board, projected, colors),
        "tracks": _track_tables(board, results, run_meta),
        "training_budgets": training_budgets(board, results),
        "assets": list(ASSETS), "threat": _threat_matrix(list(board["backend_id"]), results, run_meta),
        "roc_svg": figures.roc_small_multiples(preds, order, references, colors, baseline) if len(preds) else None,
        "agreement": agreement,
        "site_heat": _site_heatmap(ps, order), "per_site": _per_site_cells(ps),
        "per_label": _per_label_rows(pl),
        "privacy_svg": figures.privacy_figure(board, results),
        "rounds_svg": figures.rounds_figure(results),
        "audit_pictures": _audit_pictures(run_dir, results),
        "extras": _extras_view(extras, order),
        "failed": failed,
    }


def _template():
    import jinja2

    text = resources.files("suite.report").joinpath("templates", "report.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.from_string(text)


def render_report(run_dir: Path, options: ReportOptions | None = None) -> Path:
    """Write run_dir/report.html from the run folder's files alone; return its path."""
    from markupsafe import Markup

    run_dir = Path(run_dir)
    ctx = build_context(run_dir, options)
    for a in ctx["agreement"]:
        a["svg"] = Markup(a["svg"]) if a["svg"] else None
    for key in ("roc_svg", "cost_utility_svg", "privacy_svg", "rounds_svg"):
        ctx[key] = Markup(ctx[key]) if ctx[key] else None
    out = RunFolder(run_dir).report_html
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(_template().render(**ctx), encoding="utf-8")
    tmp.replace(out)
    return out
