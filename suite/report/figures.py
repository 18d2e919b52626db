"""The report's figures, as compact inline SVG drawn with matplotlib (no pyplot state).

Compact because a report must stay small enough to open at once (issue 18: <= 2 MB):
curves are thinned to what a 300-pixel panel can show, scatter clouds are rasterised
inside the SVG, and every figure is drawn once.
"""

from __future__ import annotations

import html
import io
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from suite.leaderboard import format_seconds, technique_of
from suite.results import ALL, NONE

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]
MAX_CURVE_POINTS = 160          # ROC points kept per curve (a panel is ~250 px wide)
RASTER_DPI = 80                 # scatter clouds: pixels inside the SVG, not one element per point


def f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def technique_colors(order: list[str]) -> dict[str, str]:
    """One colour per technique (mpc's engines share mpc's), so a technique reads as a group."""
    techs = list(dict.fromkeys(technique_of(b) for b in order))
    by_tech = {t: COLORS[i % len(COLORS)] for i, t in enumerate(techs)}
    return {b: by_tech[technique_of(b)] for b in order}


def figure(width: float, height: float, constrained: bool = True):
    """A matplotlib Figure without pyplot: no global state, Agg/SVG canvases only.

    Constrained layout places labels well but draws every figure twice; figures drawn
    once per configuration (agreement) use fixed margins instead."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def svg(fig, name: str) -> str:
    """Inline SVG text; ids are salted per figure so several SVGs share one page safely."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fig-{name}"}):
        fig.savefig(buf, format="svg", dpi=RASTER_DPI, metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.find("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+id="[A-Za-z][\w.]*_\d+"', "", text)    # figure_1, axes_1, ... (never referenced)
    # path coordinates to 1/100 px (only inside d="...": tick labels keep their digits)
    text = re.sub(r'\sd="([^"]*)"', lambda m: ' d="' + re.sub(r"(\d\.\d{2})\d+", r"\1", m.group(1)) + '"', text)
    text = re.sub(r">\s+<", "><", text)
    return text.replace("<svg", f'<svg role="img" aria-label="{html.escape(name)}" class="fig"', 1)


# ---------------------------------------------------------------- ROC

def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (1 + distinct) - tps
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    trapz = getattr(np, "trapezoid", None) or np.trapz
    return fpr, tpr, float(trapz(tpr, fpr))


def thin(fpr: np.ndarray, tpr: np.ndarray, n: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most n points of a step curve, ends kept (the eye cannot tell more at panel size)."""
    if len(fpr) <= n:
        return fpr, tpr
    keep = np.unique(np.r_[0, np.linspace(0, len(fpr) - 1, n).round().astype(int), len(fpr) - 1])
    return fpr[keep], tpr[keep]


def _pooled_roc(preds: pd.DataFrame, bid: str):
    """ROC of one configuration over every labelled image x label pair (micro-average)."""
    b = preds[(preds["backend_id"] == bid) & preds["y_true"].notna() & preds["prob"].notna()]
    y = (b["y_true"].to_numpy(float) > 0.5).astype(float)
    if len(b) == 0 or y.min() == y.max():
        return None
    return roc_points(y, b["prob"].to_numpy(float))


def roc_small_multiples(preds: pd.DataFrame, order: list[str], references: dict[str, str],
                        colors: dict[str, str], baseline: str | None) -> str | None:
    """One small panel per configuration: its ROC against plaintext's (grey), all labels pooled."""
    bids = [b for b in order if b != baseline and b in set(preds["backend_id"])]
    if not bids:
        return None
    base = _pooled_roc(preds, baseline) if baseline else None
    ncols = min(6, len(bids))
    nrows = math.ceil(len(bids) / ncols)
    fig = figure(1.95 * ncols + 0.2, 1.95 * nrows + 0.25)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, bid in zip(axes, bids):
        ax.plot([0, 1], [0, 1], color="#ccc", lw=0.6, ls=":")
        if base is not None:
            fx, ty = thin(base[0], base[1])
            ax.plot(fx, ty, color="#888", lw=1.6, alpha=0.7, label=f"{baseline} {base[2]:.3f}")
        mine = _pooled_roc(preds, bid)
        if mine is None:
            ax.text(0.5, 0.5, "no labelled\npredictions", ha="center", va="center", fontsize=7)
        else:
            fx, ty = thin(mine[0], mine[1])
            ax.plot(fx, ty, color=colors.get(bid, "#333"), lw=1.1, label=f"this {mine[2]:.3f}")
            ax.legend(loc="lower right", fontsize=6, frameon=False, handlelength=1.2, title="AUC (pooled)",
                      title_fontsize=6)
        ax.set_title(_short(bid, 30), fontsize=7)
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    for ax in axes[len(bids):]:
        ax.set_visible(False)
    fig.supxlabel("false positive rate", fontsize=7)
    fig.supylabel("true positive rate", fontsize=7)
    return svg(fig, "roc-small-multiples")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------- agreement

def agreement_figure(preds: pd.DataFrame, bid: str, ref: str, color: str) -> tuple[str | None, str | None]:
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

    fig = figure(6.2, 2.7, constrained=False)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.9, wspace=0.38)
    a1, a2 = fig.subplots(1, 2)
    a1.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    a1.scatter(q, p, s=6, color=color, alpha=0.6, linewidths=0, rasterized=True)
    a1.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"p {_short(ref, 24)}", ylabel="p this configuration",
           title=f"{len(m)} image×label pairs")
    a1.set_aspect("equal")
    a2.scatter(mean, diff, s=6, color=color, alpha=0.6, linewidths=0, rasterized=True)
    a2.axhline(bias, color="#333", lw=1)
    for v in (bias - 1.96 * sd, bias + 1.96 * sd):
        a2.axhline(v, color="#333", lw=0.8, ls="--")
    a2.axhline(0, color="#bbb", lw=0.6)
    a2.set(xlim=(0, 1), xlabel="mean of the two p", ylabel="p − p ref",
           title=f"Bland-Altman: LoA {bias - 1.96 * sd:.2g} to {bias + 1.96 * sd:.2g}")
    a2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (a1, a2):
        ax.title.set_fontsize(8)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        ax.tick_params(labelsize=7)
    return svg(fig, f"agreement-{bid}"), None


# ---------------------------------------------------------------- cost and utility

def cost_utility_figure(board: pd.DataFrame, projected: dict[str, list[dict]], colors: dict[str, str]) -> str | None:
    """Cost (log x) against ΔAUROC, one marker per configuration, grouped by technique.

    Inference: median latency per image; a projected network setting is a hollow marker
    joined to its measured point. Training: training time. A simulated configuration is a
    diamond. The reference sits at ΔAUROC 0 by definition (a dashed line)."""
    ok = board[(board["status"] == "ok")]
    inf = ok[(ok["track"] != "training") & (ok["latency_per_image_p50"] > 0)]
    inf = inf[~inf["technique"].isin(["null"])]
    trn = ok[(ok["track"] == "training") & (ok["fit_time"] > 0)]
    panels = [(inf, "latency_per_image_p50", "inference: latency per image (log)", format_seconds)]
    if len(trn):
        panels.append((trn, "fit_time", "training: training time (log)", format_seconds))
    if not len(inf) and not len(trn):
        return None
    fig = figure(3.9 * len(panels) + 1.3, 2.7)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    seen_tech: dict[str, str] = {}
    kinds = set()
    for ax, (rows, col, xlabel, fmt) in zip(axes, panels):
        xs = []
        for _, r in rows.iterrows():
            bid, x = r["backend_id"], f(r[col])
            y = f(r["delta_auroc_macro"])
            y = 0.0 if math.isnan(y) and r["track"] == "reference" else y
            if math.isnan(y):
                continue
            color = colors.get(bid, "#333")
            marker = "D" if r["simulated"] else "o"
            kinds.add("simulated" if r["simulated"] else "measured")
            ax.scatter([x], [y], s=30, marker=marker, color=color, zorder=3, edgecolors="white", linewidths=0.5)
            seen_tech.setdefault(r["technique"], color)
            lo, hi = f(r["delta_ci_low"]), f(r["delta_ci_high"])
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.plot([x, x], [lo, hi], color=color, lw=0.8, alpha=0.7, zorder=2)
            xs.append(x)
            if col == "latency_per_image_p50":
                for p in projected.get(bid, []):
                    px = f(p["value"])
                    if px > 0:
                        kinds.add("projected")
                        ax.plot([x, px], [y, y], color=color, lw=0.7, ls=":", zorder=1)
                        ax.scatter([px], [y], s=26, marker="o", facecolors="white", edgecolors=color,
                                   linewidths=1.0, zorder=3)
                        ax.annotate(p["network"], (px, y), fontsize=6, xytext=(3, -8), textcoords="offset points",
                                    color=color)
                        xs.append(px)
            label = bid[len(r["technique"]):].strip("[]") or r["technique"]
            ax.annotate(_short(label, 22), (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points",
                        color="#333")
        ax.axhline(0, color="#999", lw=0.8, ls="--", zorder=0)
        if xs:
            ax.set_xscale("log")
            lo, hi = min(xs), max(xs)
            ax.set_xlim(lo / 2.5, hi * 4)
            from matplotlib.ticker import FuncFormatter, NullFormatter
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        from matplotlib.ticker import FuncFormatter as _F
        ax.yaxis.set_major_formatter(_F(lambda v, _: f"{v:+.3f}" if abs(v) >= 5e-4 or v == 0 else f"{v:+.0e}"))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("ΔAUROC vs reference [95% CI]", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="#eee", lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in seen_tech.items()]
    if "simulated" in kinds:
        handles.append(Line2D([], [], marker="D", ls="", color="#555", label="simulated"))
    if "projected" in kinds:
        handles.append(Line2D([], [], marker="o", ls=":", color="#555", markerfacecolor="white",
                              label="projected (network model)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
    return svg(fig, "cost-utility")


# ---------------------------------------------------------------- privacy and training curves

def privacy_figure(board: pd.DataFrame, results: pd.DataFrame) -> str | None:
    """Utility and attack success against the privacy budget, side by side."""
    pooled = results[(results["site"] == ALL) & (results["label"] == NONE)]
    eps = pooled[pooled["metric"].isin(["epsilon", "dp_epsilon"])].groupby("backend_id")["value"].last()
    eps = pd.to_numeric(eps, errors="coerce").dropna()
    eps = eps[np.isfinite(eps) & (eps > 0)]
    if eps.empty:
        return None
    mia = pd.to_numeric(pooled[pooled["metric"] == "mia_auroc"].groupby("backend_id")["value"].last(),
                        errors="coerce")
    b = board.set_index("backend_id")
    fig = figure(8.0, 2.8)
    ax_auc, ax_mia = fig.subplots(1, 2)
    for bid, e in sorted(eps.items(), key=lambda kv: kv[1]):
        if bid not in b.index:
            continue
        r = b.loc[bid]
        v, lo, hi = f(r["auroc_macro"]), f(r["auroc_macro_ci_low"]), f(r["auroc_macro_ci_high"])
        ax_auc.errorbar([e], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt="o", color="#1f77b4", capsize=3)
        ax_auc.annotate(_short(bid, 26), (e, v), fontsize=6, xytext=(4, 4), textcoords="offset points")
        if bid in mia.index and np.isfinite(mia[bid]):
            ax_mia.plot([e], [mia[bid]], "s", color="#d62728")
            ax_mia.annotate(_short(bid, 26), (e, mia[bid]), fontsize=6, xytext=(4, 4), textcoords="offset points")
    refs = {r for r in b.loc[[x for x in eps.index if x in b.index], "reference"] if isinstance(r, str)}
    for ref in refs:
        if ref in b.index and np.isfinite(f(b.loc[ref, "auroc_macro"])):
            ax_auc.axhline(f(b.loc[ref, "auroc_macro"]), color="#888", ls="--", lw=1, label=f"{ref} (non-private)")
        if ref in mia.index and np.isfinite(mia[ref]):
            ax_mia.axhline(mia[ref], color="#888", ls="--", lw=1, label=f"{ref} (non-private)")
    ax_mia.axhline(0.5, color="#bbb", ls=":", lw=0.8)
    seen = [v for v in mia.to_numpy(float) if np.isfinite(v)]
    ax_mia.set_ylim(min([0.45] + seen) - 0.02, max([0.6] + seen) + 0.02)  # do not magnify noise at 0.5
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax, ylabel in ((ax_auc, "macro AUROC [95% CI]"), (ax_mia, "membership attack AUROC")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("achieved epsilon (log)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="#eee")
        ax.spines[["top", "right"]].set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, frameon=False)
    return svg(fig, "privacy-utility")


ROUND_METRICS = {"round_val_auroc": "validation AUROC", "round_auroc": "AUROC (federated evaluation)",
                 "round_train_loss": "training loss", "round_loss": "loss (federated evaluation)"}


def round_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per-round rows (backend_id, metric, round, value), from the `round` column (schema 2)
    or the older `phase = round-N` form; the last row of a round wins."""
    df = results[results["metric"].isin(list(ROUND_METRICS))].copy()
    if df.empty:
        return pd.DataFrame(columns=["backend_id", "metric", "round", "value"])
    rnd = pd.to_numeric(df["round"], errors="coerce") if "round" in df.columns else pd.Series(np.nan, df.index)
    if "phase" in df.columns:
        from_phase = pd.to_numeric(df["phase"].astype(str).str.extract(r"round-(\d+)")[0], errors="coerce")
        rnd = rnd.fillna(from_phase)
    df["round"] = rnd
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df = df.dropna(subset=["round", "value"])
    if "party" in df.columns:
        df = df[df["party"].isna()]
    return df.drop_duplicates(["backend_id", "metric", "round"], keep="last")[["backend_id", "metric", "round", "value"]]


def rounds_figure(results: pd.DataFrame) -> str | None:
    """Federated training curves: one panel per per-round metric, one line per configuration
    (its own colour: configurations of one technique are told apart here)."""
    df = round_table(results)
    if df.empty:
        return None
    metrics = [m for m in ROUND_METRICS if m in set(df["metric"])]
    fig = figure(3.2 * len(metrics) + 1.8, 2.5)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    line_colors = {b: COLORS[i % len(COLORS)] for i, b in enumerate(dict.fromkeys(df["backend_id"]))}
    for ax, metric in zip(axes, metrics):
        for bid, sub in df[df["metric"] == metric].groupby("backend_id", sort=False):
            sub = sub.sort_values("round")
            ax.plot(sub["round"], sub["value"], marker="o", ms=2.5, lw=1, color=line_colors[bid],
                    label=_short(str(bid), 28))
        ax.set_xlabel("round", fontsize=8)
        ax.set_title(ROUND_METRICS[metric], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="#eee")
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=6, frameon=False)
    return svg(fig, "rounds")
