"""One self-contained HTML report from a run folder.

Reads only run.json, results.jsonl and predictions.parquet, never imports a backend
or torch, and writes `report.html`: inline CSS, a small inline script for sortable
tables, and matplotlib figures embedded as inline SVG, so it opens offline.

    render_report(run_dir) -> run_dir / "report.html"
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from suite.leaderboard import (
    DASH, backend_order, build_leaderboard, format_bytes, format_ci, format_count, format_p,
    format_seconds, format_small, format_value, per_label_table, per_site_table, read_run_meta,
    threat_model,
)
from suite.metrics import METRICS
from suite.results import ALL, MACRO, NONE, read_results
from suite.threat_model import ASSETS

__all__ = ["render_report", "build_context"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]


# ---------------------------------------------------------------- figures

def _figure(width: float, height: float):
    """A matplotlib Figure without pyplot: no global state, Agg/SVG canvases only."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig, name: str) -> str:
    """Inline SVG text; ids are salted per figure so several SVGs share one page safely."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fig-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.find("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+id="[A-Za-z][\w.]*_\d+"', "", text)    # figure_1, axes_1, ... (never referenced)
    return text.replace("<svg", f'<svg role="img" aria-label="{html.escape(name)}" class="fig"', 1)


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (1 + distinct) - tps
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr, float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def _roc_figures(preds: pd.DataFrame, labels: list[str], order: list[str], colors: dict) -> list[dict]:
    figs = []
    for label in labels:
        fig = _figure(4.0, 3.8)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls=":")
        drawn = 0
        sub = preds[(preds["label"] == label) & preds["y_true"].notna() & preds["prob"].notna()]
        for i, bid in enumerate(order):
            b = sub[sub["backend_id"] == bid]
            y = b["y_true"].to_numpy(dtype=float)
            if len(b) == 0 or y.min() == y.max():
                continue
            fpr, tpr, auc = _roc_points((y > 0.5).astype(float), b["prob"].to_numpy(dtype=float))
            ax.plot(fpr, tpr, color=colors[bid], ls=_STYLES[i % len(_STYLES)], lw=2.4 if i == 0 else 1.4,
                    alpha=0.55 if i == 0 else 0.95, label=f"{bid} (AUC {auc:.3f})")
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no labelled predictions", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="lower right", fontsize=8, frameon=False)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{label} (pooled sites, n={sub['image_id'].nunique()})")
        ax.set_aspect("equal")
        ax.title.set_fontsize(10)
        figs.append({"label": label, "svg": _svg(fig, f"roc-{label}")})
    return figs


def _agreement_figure(preds: pd.DataFrame, bid: str, ref: str, color: str) -> tuple[str | None, str | None]:
    """(svg, None) or (None, why not): scatter p vs p_ref and Bland-Altman of p - p_ref."""
    mine = preds[preds["backend_id"] == bid]
    theirs = preds[preds["backend_id"] == ref]
    if mine.empty:
        return None, f"no predictions for {bid}"
    if theirs.empty:
        return None, f"no predictions for its reference {ref}"
    m = mine.merge(theirs[["image_id", "label", "prob"]], on=["image_id", "label"], suffixes=("", "_ref"))
    m = m[m["prob"].notna() & m["prob_ref"].notna()]
    if m.empty:
        return None, f"no image/label pairs shared with {ref}"
    p, q = m["prob"].to_numpy(float), m["prob_ref"].to_numpy(float)
    diff, mean = p - q, (p + q) / 2
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0

    fig = _figure(8.4, 3.6)
    a1, a2 = fig.subplots(1, 2)
    a1.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    a1.scatter(q, p, s=9, color=color, alpha=0.6, linewidths=0)
    a1.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"p {ref}", ylabel=f"p {bid}",
           title=f"{bid} vs {ref} ({len(m)} image×label pairs)")
    a1.set_aspect("equal")
    a2.scatter(mean, diff, s=9, color=color, alpha=0.6, linewidths=0)
    a2.axhline(bias, color="#333", lw=1, label=f"bias {bias:.2g}")
    for v in (bias - 1.96 * sd, bias + 1.96 * sd):
        a2.axhline(v, color="#333", lw=0.8, ls="--")
    a2.axhline(0, color="#bbb", lw=0.6)
    a2.set(xlim=(0, 1), xlabel=f"mean of p {bid} and p {ref}", ylabel=f"p {bid} − p {ref}",
           title=f"Bland-Altman (LoA {bias - 1.96 * sd:.2g} to {bias + 1.96 * sd:.2g})")
    a2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (a1, a2):
        ax.title.set_fontsize(10)
    return _svg(fig, f"agreement-{bid}"), None


def _site_figure(ps: pd.DataFrame, order: list[str], colors: dict) -> str | None:
    """Macro AUROC per site: one point with its 95% CI per backend, dodged within each site."""
    ps = ps[ps["site"] != ALL]
    sites = list(dict.fromkeys(ps["site"]))
    bids = [b for b in order if b in set(ps["backend_id"])]
    if not sites or not bids:
        return None
    fig = _figure(min(11.0, max(5.5, 0.45 * len(sites) * len(bids) + 2.5)), 3.4)
    ax = fig.add_subplot()
    step = min(0.8 / len(bids), 0.22)
    x = np.arange(len(sites))
    lows = [0.5]
    for i, bid in enumerate(bids):
        b = ps[ps["backend_id"] == bid].set_index("site").reindex(sites)
        v = b["auroc_macro"].to_numpy(float)
        lo, hi = b["auroc_macro_ci_low"].to_numpy(float), b["auroc_macro_ci_high"].to_numpy(float)
        err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
        ax.errorbar(x + (i - (len(bids) - 1) / 2) * step, v, yerr=err, fmt="o", ms=5, capsize=3, lw=1.2,
                    color=colors[bid], label=bid)
        lows += [float(np.nanmin(lo)) if np.isfinite(lo).any() else 0.5,
                 float(np.nanmin(v)) if np.isfinite(v).any() else 0.5]
    ax.axhline(0.5, color="#bbb", lw=0.8, ls=":")
    ax.set_xticks(x, sites, fontsize=9)
    ax.set_xlim(-0.6, len(sites) - 0.4)
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_ylabel("macro AUROC [95% CI]", fontsize=9)
    ax.grid(axis="y", color="#eee")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False, ncols=min(6, len(bids)), loc="lower center",
              bbox_to_anchor=(0.5, 1.0))
    return _svg(fig, "per-site")


def _privacy_figure(board: pd.DataFrame, results: pd.DataFrame) -> str | None:
    """Utility and attack success against the privacy budget, side by side.

    Any backend that reports an `epsilon` row is a point; its reference (the non-private
    control) is drawn as a dashed line, so the price of each epsilon reads off directly.
    """
    pooled = results[(results["site"] == ALL) & (results["label"] == NONE)]
    eps = pooled[pooled["metric"] == "epsilon"].groupby("backend_id")["value"].last().dropna()
    if eps.empty:
        return None
    mia = pooled[pooled["metric"] == "mia_auroc"].groupby("backend_id")["value"].last()
    b = board.set_index("backend_id")
    fig = _figure(9.5, 3.2)
    ax_auc, ax_mia = fig.subplots(1, 2)
    for bid, e in sorted(eps.items(), key=lambda kv: kv[1]):
        if bid not in b.index:
            continue
        r = b.loc[bid]
        v, lo, hi = _f(r["auroc_macro"]), _f(r["auroc_macro_ci_low"]), _f(r["auroc_macro_ci_high"])
        ax_auc.errorbar([e], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt="o", color="#1f77b4", capsize=3)
        ax_auc.annotate(bid, (e, v), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if bid in mia.index:
            ax_mia.plot([e], [mia[bid]], "s", color="#d62728")
            ax_mia.annotate(bid, (e, mia[bid]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    refs = {r for r in b.loc[[x for x in eps.index if x in b.index], "reference"] if isinstance(r, str)}
    for ref in refs:
        if ref in b.index and np.isfinite(_f(b.loc[ref, "auroc_macro"])):
            ax_auc.axhline(_f(b.loc[ref, "auroc_macro"]), color="#888", ls="--", lw=1, label=f"{ref} (non-private)")
        if ref in mia.index:
            ax_mia.axhline(mia[ref], color="#888", ls="--", lw=1, label=f"{ref} (non-private)")
    ax_mia.axhline(0.5, color="#bbb", ls=":", lw=0.8)
    seen = [v for v in mia.to_numpy(float) if np.isfinite(v)]
    ax_mia.set_ylim(min([0.45] + seen) - 0.02, max([0.6] + seen) + 0.02)  # do not magnify noise at 0.5
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax, ylabel in ((ax_auc, "macro AUROC [95% CI]"), (ax_mia, "membership attack AUROC")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("achieved epsilon (log)", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(color="#eee")
        ax.spines[["top", "right"]].set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    return _svg(fig, "privacy-utility")


def _audit_pictures(run_dir: Path) -> list[dict]:
    """Reconstructions a backend's privacy audit saved in its work folder (e.g. gradient
    inversion in `fl`), embedded as data URIs so the report stays one file."""
    import base64

    pictures = []
    for png in sorted((run_dir / "work").glob("*/audit*/inversion-*.png")):
        if png.stat().st_size > 2_000_000:
            continue
        pictures.append({"backend_id": png.parent.parent.name, "audit": png.parent.name,
                         "view": png.stem.removeprefix("inversion-"),
                         "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()})
    return pictures


def _cost_figure(board: pd.DataFrame, extras: pd.DataFrame, colors: dict) -> str | None:
    """Two log-scale bar charts: latency per image (measured, plus each projected setting
    hatched on its own row) and online communication per image. Configurations of one
    backend (e.g. mpc's engines and protocols) sit next to each other, in run order."""
    ok = board[board["status"] == "ok"]
    if ok.empty:
        return None
    names = [str(b).split("[")[0] for b in ok["backend_id"]]
    first = {n: names.index(n) for n in names}
    ok = ok.iloc[sorted(range(len(ok)), key=lambda i: (first[names[i]], i))]
    bids = list(ok["backend_id"])
    proj = extras[extras["metric"].str.contains("projected") & extras["metric"].str.contains("latency")
                  & (extras["label"] == NONE) & (extras["site"] == ALL)] if len(extras) else extras
    lat_rows = []   # (label, value, color, projected)
    for _, r in ok.iterrows():
        bid = r["backend_id"]
        lat_rows.append((bid, _f(r["latency_per_image_p50"]), colors[bid], False))
        mine = proj[proj["backend_id"] == bid].drop_duplicates("metric", keep="last") if len(proj) else proj
        for _, e in mine.iterrows():
            setting = e["metric"].replace("projected_", "").replace("latency_per_image", "").strip("_")
            lat_rows.append((f"{bid} · {setting.replace('_', ' ') or 'projected'}", _f(e["value"]),
                             colors[bid], True))
    comm = [(bid, _f(v), colors[bid]) for bid, v in zip(bids, ok["bytes_per_image"])]

    n = max(len(lat_rows), len(comm))
    fig = _figure(9.6, 1.1 + 0.32 * n)
    a1, a2 = fig.subplots(1, 2)
    _hbars(a1, [(lab, v, c, hatched) for lab, v, c, hatched in lat_rows], format_seconds,
           "latency per image (log)" + ("; hatched = projected" if any(r[3] for r in lat_rows) else ""))
    _hbars(a2, [(lab, v, c, False) for lab, v, c in comm], format_bytes, "communication per image (log)")
    return _svg(fig, "cost")


def _hbars(ax, rows: list[tuple[str, float, str, bool]], fmt, xlabel: str) -> None:
    from matplotlib.colors import to_rgba

    y = np.arange(len(rows))
    vals = np.array([v for _, v, _, _ in rows], dtype=float)
    good = np.isfinite(vals) & (vals > 0)
    for k, (lab, v, color, hatched) in enumerate(rows):
        if good[k]:
            # a pale opaque face: SVG hatches are a pattern over the face, so transparency would fade the lines too
            face = tuple(0.25 * c + 0.75 for c in to_rgba(color)[:3]) if hatched else color
            ax.barh(k, v, 0.7, color=face, hatch="///" if hatched else None,
                    edgecolor=color if hatched else "none", linewidth=0.8)
        ax.text(v if good[k] else 0.01, k, " " + fmt(v), va="center", fontsize=7.5,
                transform=ax.transData if good[k] else ax.get_yaxis_transform())
    _log_axis(ax, list(vals[good]), xlabel)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)


def _log_axis(ax, positives: list[float], xlabel: str) -> None:
    if positives:
        lo, hi = min(positives), max(positives)
        ax.set_xscale("log")
        ax.set_xlim(lo / 3, hi * 12)
    else:
        ax.text(0.5, 0.5, "no positive values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=9)


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


def _leaderboard_table(board: pd.DataFrame, extras: pd.DataFrame) -> dict:
    proj = extras[extras["metric"].str.contains("projected") & (extras["label"] == NONE)
                  & (extras["site"] == ALL) & extras["party"].isna()] if len(extras) else extras
    proj_metrics = list(dict.fromkeys(proj["metric"])) if len(proj) else []
    headers = [("backend", ""), ("track", ""), ("status", ""), ("protects", ""),
               ("macro AUROC [95% CI]", "num"), ("ΔAUROC [95% CI]", "num"), ("min DeLong p", "num"),
               ("max |Δp|", "num"), ("latency / img", "num")]
    headers += [(_short_metric(m), "num projected") for m in proj_metrics]
    headers += [("comm / img", "num"), ("rounds / img", "num"), ("peak RSS", "num"), ("setup", "num"),
                ("fit", "num"), ("images", "num"), ("guarantee", "wrap")]
    rows = []
    for _, r in board.iterrows():
        bid = r["backend_id"]
        units = {}
        cells = [
            _cell(bid, bid, "name", "SIMULATED" if r["simulated"] else ""),
            _cell(r["track"], r["track"]),
            _cell(r["status"], r["status"], "status-" + str(r["status"])),
            _cell(r["protects"] or "nothing", r["protects"] or ""),
            _cell(format_ci(r["auroc_macro"], r["auroc_macro_ci_low"], r["auroc_macro_ci_high"]), _f(r["auroc_macro"])),
            _cell(format_ci(r["delta_auroc_macro"], r["delta_ci_low"], r["delta_ci_high"], signed=True),
                  _f(r["delta_auroc_macro"])),
            _cell(format_p(r["min_delong_p"]), _f(r["min_delong_p"])),
            _cell(format_small(r["max_abs_diff"]), _f(r["max_abs_diff"])),
            _cell(format_seconds(r["latency_per_image_p50"]), _f(r["latency_per_image_p50"])),
        ]
        for m in proj_metrics:
            hit = proj[(proj["backend_id"] == bid) & (proj["metric"] == m)]
            v = _f(hit["value"].iloc[-1]) if len(hit) else float("nan")
            unit = str(hit["unit"].iloc[-1]) if len(hit) else ""
            units[m] = unit
            note = str(hit["note"].iloc[-1]) if len(hit) and isinstance(hit["note"].iloc[-1], str) else ""
            cells.append(_cell(format_value(v, unit), v, "projected", "", f"projected: {m}" + (f" ({note})" if note else "")))
        cells += [
            _cell(format_bytes(r["bytes_per_image"]), _f(r["bytes_per_image"])),
            _cell(format_count(r["rounds_per_image"]), _f(r["rounds_per_image"])),
            _cell(format_bytes(r["peak_rss"]), _f(r["peak_rss"])),
            _cell(format_seconds(r["setup_time"]), _f(r["setup_time"])),
            _cell(format_seconds(r["fit_time"]), _f(r["fit_time"])),
            _cell(format_count(r["n_images"]), _f(r["n_images"])),
            _cell(r["guarantee"] if isinstance(r["guarantee"], str) else DASH, r["guarantee"] if isinstance(r["guarantee"], str) else ""),
        ]
        rows.append({"cells": cells, "simulated": bool(r["simulated"]), "failed": r["status"] != "ok"})
    return {"headers": [{"text": h, "cls": c, "projected": "projected" in c} for h, c in headers], "rows": rows}


def _short_metric(name: str) -> str:
    """'projected_latency_per_image_wan' -> 'latency / img wan' (the badge says projected)."""
    short = name.replace("projected_", "").replace("_per_image", " / img").replace("_", " ")
    return short.strip() or name


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


_EXTRA_KEY = ["metric", "site", "label", "party", "phase"]


def _extras(results: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows of metrics outside suite.metrics.METRICS (backend-specific), in run order."""
    known = set(METRICS) | {"status"}
    df = results[~results["metric"].isin(known) & results["metric"].notna()].copy()
    for col in ("party", "phase", "note", "unit"):
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
    out = []
    for bid in order:
        mine = extras[extras["backend_id"] == bid].drop_duplicates(_EXTRA_KEY, keep="last")
        if mine.empty:
            continue
        rows = []
        for _, r in mine.iterrows():
            unit = r["unit"] if isinstance(r["unit"], str) else ""
            ci = ""
            if not (math.isnan(r["ci_low"]) or math.isnan(r["ci_high"])):
                ci = f"[{format_value(r['ci_low'], unit)}, {format_value(r['ci_high'], unit)}]"
            where = ", ".join(f"{k} {r[k]}" for k in ("party", "phase") if isinstance(r.get(k), str) and r[k])
            rows.append({
                "metric": r["metric"] + (f" ({where})" if where else ""), "projected": "projected" in r["metric"],
                "site": "pooled" if r["site"] == ALL else r["site"],
                "label": "" if r["label"] in (NONE, ALL) else ("macro" if r["label"] == MACRO else r["label"]),
                "value": format_value(r["value"], unit), "sort": _sortable(r["value"]), "ci": ci,
                "unit": unit, "note": r["note"] if isinstance(r.get("note"), str) else "",
            })
        out.append({"backend_id": bid, "rows": rows})
    return out


# ---------------------------------------------------------------- main

def _read_predictions(run_dir: Path, notes: list[str]) -> pd.DataFrame:
    cols = ["backend_id", "backend", "dataset", "image_id", "site", "label", "y_true", "prob"]
    path = run_dir / "predictions.parquet"
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


def build_context(run_dir: Path) -> dict:
    """Everything the template shows, computed from the run folder's files only."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    run_meta = read_run_meta(run_dir)
    if not run_meta:
        notes.append("run.json is missing or unreadable: metadata comes from results.jsonl only.")
    results = read_results(run_dir / "results.jsonl")
    if results.empty:
        notes.append("results.jsonl has no rows.")
    for col in ("metric", "site", "label", "backend_id"):
        results[col] = results[col].astype(object)
    preds = _read_predictions(run_dir, notes)

    order = backend_order(results, run_meta)
    order += [b for b in dict.fromkeys(preds["backend_id"].dropna().astype(str)) if b not in order]
    colors = {b: _COLORS[i % len(_COLORS)] for i, b in enumerate(order)}
    board = build_leaderboard(results, run_meta)
    extras = _extras(results, order)
    ds = run_meta.get("dataset") or {}
    labels = list(ds.get("label_names") or [])
    labels += [lab for lab in dict.fromkeys(preds["label"].dropna().astype(str)) if lab not in labels]

    roc = _roc_figures(preds, labels, order, colors) if len(preds) else []
    agreement = []
    for _, r in board.iterrows():
        ref = r["reference"]
        if not isinstance(ref, str) or not ref or ref == r["backend_id"]:
            continue
        if r["status"] != "ok":
            agreement.append({"backend_id": r["backend_id"], "reference": ref, "svg": None,
                              "why": f"{r['backend_id']} did not finish ({r['status']})", "stats": []})
            continue
        svg, why = _agreement_figure(preds, r["backend_id"], ref, colors.get(r["backend_id"], "#333"))
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
    backend_meta = []
    for b in order:
        meta = (run_meta.get("backends") or {}).get(b) or {}
        if meta.get("versions") or meta.get("options"):
            backend_meta.append({"backend_id": b, "versions": meta.get("versions") or {},
                                 "options": meta.get("options") or {}})
    first = results.iloc[0] if len(results) else pd.Series(dtype=object)
    return {
        "run_id": run_meta.get("run_id") or first.get("run_id") or run_dir.name,
        "started_at": run_meta.get("started_at"), "finished_at": run_meta.get("finished_at"),
        "git_sha": run_meta.get("git_sha") or first.get("git_sha"),
        "suite_version": run_meta.get("suite_version") or first.get("suite_version"),
        "seed": run_meta.get("seed", first.get("seed")),
        "config_hash": run_meta.get("config_hash") or first.get("config_hash"),
        "dataset": ds, "dataset_name": ds.get("name") or (first.get("dataset") if len(results) else None),
        "model": model, "versions": run_meta.get("versions") or {},
        "backend_meta": backend_meta,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": notes,
        "n_backends": len(board), "n_ok": int((board["status"] == "ok").sum()) if len(board) else 0,
        "leaderboard": _leaderboard_table(board, extras),
        "assets": list(ASSETS), "threat": _threat_matrix(list(board["backend_id"]), results, run_meta),
        "roc": roc, "agreement": agreement,
        "site_svg": _site_figure(ps, order, colors), "per_site": _per_site_cells(ps),
        "per_label": _per_label_rows(pl),
        "cost_svg": _cost_figure(board, extras, colors),
        "privacy_svg": _privacy_figure(board, results),
        "audit_pictures": _audit_pictures(run_dir),
        "extras": _extras_view(extras, order),
        "failed": failed,
    }


def _template():
    import jinja2

    text = resources.files("suite.report").joinpath("templates", "report.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.from_string(text)


def render_report(run_dir: Path) -> Path:
    """Write run_dir/report.html from the run folder's files alone; return its path."""
    from markupsafe import Markup

    run_dir = Path(run_dir)
    ctx = build_context(run_dir)
    for fig in ctx["roc"]:
        fig["svg"] = Markup(fig["svg"])
    for a in ctx["agreement"]:
        a["svg"] = Markup(a["svg"]) if a["svg"] else None
    for key in ("site_svg", "cost_svg", "privacy_svg"):
        ctx[key] = Markup(ctx[key]) if ctx[key] else None
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(_template().render(**ctx), encoding="utf-8")
    tmp.replace(out)
    return out
