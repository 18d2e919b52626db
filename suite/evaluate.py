"""Turn stored predictions and timings into tidy metric rows.

Pure with respect to the run folder: `suite report` can recompute everything from
predictions.parquet without touching a backend. Comparisons against a reference are
always paired on the images both saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from suite.metrics import spec
from suite.metrics.agreement import agreement
from suite.metrics.auroc import bootstrap_macro_auroc, bootstrap_paired_macro_delta, delong_ci, paired_delong
from suite.metrics.perf import latency_summary
from suite.results import ALL, MACRO, ResultRow


def _row(base: dict[str, Any], metric: str, value, **kw) -> ResultRow:
    s = spec(metric)
    return ResultRow(
        metric=metric, value=None if value is None else float(value),
        unit=kw.pop("unit", s.unit if s else ""),
        higher_is_better=kw.pop("higher_is_better", s.higher_is_better if s else None),
        **base, **kw,
    )


def wide(preds: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(y_true, prob) as image x label tables, indexed by image_id, with a site column."""
    y = preds.pivot(index="image_id", columns="label", values="y_true")
    p = preds.pivot(index="image_id", columns="label", values="prob")
    sites = preds.drop_duplicates("image_id").set_index("image_id")["site"]
    y.insert(0, "__site__", sites.reindex(y.index))
    return y, p


def _site_groups(y: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    groups = [(ALL, np.ones(len(y), dtype=bool))]
    for site in sorted(y["__site__"].unique()):
        groups.append((site, (y["__site__"] == site).to_numpy()))
    return groups


def accuracy_rows(base: dict[str, Any], preds: pd.DataFrame, labels: list[str],
                  seed: int) -> list[ResultRow]:
    """AUROC with DeLong CIs per site x label, and macro with a bootstrap CI."""
    y, p = wide(preds)
    rows = []
    for site, mask in _site_groups(y):
        Y, P = y.loc[mask, labels].to_numpy(float), p.loc[mask, labels].to_numpy(float)
        for j, label in enumerate(labels):
            known = ~np.isnan(Y[:, j])
            yj, pj = Y[known, j], P[known, j]
            n = int(known.sum())
            rows.append(_row(base, "prevalence", yj.mean() if n else None, site=site, label=label, n=n))
            if n and 0 < yj.sum() < n:
                ci = delong_ci(yj, pj)
                note = None if np.isfinite(ci.ci_low) else "no CI: fewer than two images of one class"
                rows.append(_row(base, "auroc", ci.auc, site=site, label=label, n=n,
                                 ci_low=ci.ci_low, ci_high=ci.ci_high, ci_method="delong", note=note))
            else:
                rows.append(_row(base, "auroc", None, site=site, label=label, n=n,
                                 note="only one class present"))
        value, lo, hi = bootstrap_macro_auroc(Y, P, seed=seed)
        rows.append(_row(base, "auroc", value, site=site, label=MACRO, n=len(Y),
                         ci_low=lo, ci_high=hi, ci_method="bootstrap_percentile"))
    return rows


def paired_rows(base: dict[str, Any], preds: pd.DataFrame, ref_preds: pd.DataFrame,
                labels: list[str], seed: int) -> list[ResultRow]:
    """Paired DeLong and output agreement against the reference, on shared images only."""
    y, p = wide(preds)
    _, pr = wide(ref_preds)
    shared = p.index.intersection(pr.index)
    y, p, pr = y.loc[shared], p.loc[shared], pr.loc[shared]
    rows = []
    for site, mask in _site_groups(y):
        Y = y.loc[mask, labels].to_numpy(float)
        P, PR = p.loc[mask, labels].to_numpy(float), pr.loc[mask, labels].to_numpy(float)
        for j, label in enumerate(labels):
            known = ~np.isnan(Y[:, j])
            yj = Y[known, j]
            n = int(known.sum())
            if n and 0 < yj.sum() < n:
                d = paired_delong(yj, P[known, j], PR[known, j])
                rows.append(_row(base, "auroc_delta", d.delta, site=site, label=label, n=n,
                                 ci_low=d.ci_low, ci_high=d.ci_high, ci_method="delong_paired"))
                rows.append(_row(base, "delong_p", d.p_value, site=site, label=label, n=n))
        delta, lo, hi = bootstrap_paired_macro_delta(Y, P, PR, seed=seed)
        rows.append(_row(base, "auroc_delta", delta, site=site, label=MACRO, n=len(Y),
                         ci_low=lo, ci_high=hi, ci_method="bootstrap_percentile"))
    P, PR = p[labels].to_numpy(float), pr[labels].to_numpy(float)
    for j, label in enumerate(labels + [ALL]):
        a, b = (P.reshape(-1), PR.reshape(-1)) if label == ALL else (P[:, j], PR[:, j])
        for metric, value in agreement(b, a).items():
            rows.append(_row(base, metric, value, site=ALL, label=label, n=len(a)))
    return rows


def cost_rows(base: dict[str, Any], part: dict[str, Any], proc: dict[str, Any]) -> list[ResultRow]:
    """Latency, memory and traffic rows from the harness's own measurements."""
    t = part.get("timings") or {}
    n_images = int(sum(t.get("batch_sizes") or [0]))
    rows = [_row(base, "n_images", n_images, n=n_images),
            _row(base, "batch_size", part.get("batch_size")),
            _row(base, "wall_time", proc.get("wall_s")),
            _row(base, "peak_rss", proc.get("peak_rss")),
            _row(base, "peak_rss_max_process", proc.get("peak_rss_max_process"))]
    for metric, key in (("setup_time", "setup_s"), ("fit_time", "fit_s"), ("audit_time", "audit_s")):
        if t.get(key) is not None:
            rows.append(_row(base, metric, t[key]))
    if t.get("batch_seconds"):
        for metric, value in latency_summary(t["batch_seconds"], t["batch_sizes"]).items():
            rows.append(_row(base, metric, value, n=n_images))
    traffic = pd.DataFrame(part.get("traffic") or [],
                           columns=["phase", "party", "bytes_sent", "bytes_received", "rounds", "messages"])
    online = traffic[traffic.phase == "online"]
    setup = traffic[traffic.phase == "setup"]
    fit = traffic[traffic.phase == "fit"]
    sent, received = int(online.bytes_sent.sum()), int(online.bytes_received.sum())
    rounds = int(online.rounds.max()) if len(online) else 0
    messages = int(online.messages.sum())
    # a backend whose transport counts messages but not rounds (SPU) reports rounds=0 with
    # messages > 0: no rounds rows then, rather than a false zero
    counts_rounds = not (len(traffic) and int(traffic.rounds.sum()) == 0 and int(traffic.messages.sum()) > 0)
    rows += [_row(base, "bytes_sent", sent), _row(base, "bytes_received", received),
             _row(base, "setup_bytes", int(setup.bytes_sent.sum())),
             _row(base, "fit_bytes", int(fit.bytes_sent.sum()))]
    if counts_rounds:
        rows.append(_row(base, "rounds", rounds))
    if messages:
        rows.append(_row(base, "messages", messages))
    if n_images:
        rows.append(_row(base, "bytes_per_image", sent / n_images, n=n_images))
        if counts_rounds:
            rows.append(_row(base, "rounds_per_image", rounds / n_images, n=n_images))
        if messages:
            rows.append(_row(base, "messages_per_image", messages / n_images, n=n_images))
    per_party = (("party_bytes_sent", "bytes_sent"), ("party_bytes_received", "bytes_received"))
    per_party += (("party_rounds", "rounds"),) if counts_rounds else (("party_messages", "messages"),)
    for (party, phase), g in traffic.groupby(["party", "phase"]):
        for metric, column in per_party:
            rows.append(_row(base, metric, int(g[column].sum()), unit=column.split("_")[0],
                             higher_is_better=False, party=party, phase=phase))
    audit = part.get("audit") or {}
    if audit.get("status") == "failed":
        rows.append(_row(base, "audit", None, unit="", higher_is_better=None, phase="audit",
                         status="failed", error=audit.get("error"),
                         note="the audit phase failed; its rows are missing"))
    for extra in list(part.get("extra_rows") or []) + list(audit.get("rows") or []):
        extra = dict(extra)
        metric, value = extra.pop("metric"), extra.pop("value")
        rows.append(_row(base, metric, value, **{k: v for k, v in extra.items()
                                                 if k in ResultRow.__dataclass_fields__}))
    return rows
