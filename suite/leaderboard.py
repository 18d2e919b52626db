"""One leaderboard: what each backend configuration costs and what it protects.

Built from tidy result rows (`results.jsonl`) and run metadata (`run.json`) alone, so
it can be rebuilt at any time without re-running a backend. One row per backend
configuration, in run order; every number sits next to the guarantee it bought.

    write_leaderboard(run_dir)   -> leaderboard.csv (raw numbers) + leaderboard.md (formatted)
    print_leaderboard(df)        -> compact rich table in the terminal
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from suite.results import ALL, MACRO, NONE, read_results
from suite.run_folder import RunFolder

LEADERBOARD_COLUMNS = [
    "backend_id", "technique", "track", "protects", "from_whom", "trust", "guarantee", "simulated",
    "status", "n_images",
    "auroc_macro", "auroc_macro_ci_low", "auroc_macro_ci_high",
    "delta_auroc_macro", "delta_ci_low", "delta_ci_high", "min_delong_p", "reference",
    "max_abs_diff", "latency_per_image_p50", "bytes_per_image", "rounds_per_image",
    "peak_rss", "setup_time", "fit_time", "fit_bytes", "fit_time_ratio", "training_rounds",
    "projected_latency_lan", "projected_latency_wan", "cpu_per_image", "cpu_source",
    "epsilon", "dp_delta", "privacy_level", "mia_auroc", "protected_scope", "error",
]

# cost columns copied straight from rows with label __none__, site __all__
_COST_COLUMNS = ["latency_per_image_p50", "bytes_per_image", "rounds_per_image", "peak_rss",
                 "setup_time", "fit_time", "fit_bytes"]
_NOT_A_LABEL = {ALL, NONE, MACRO}
_TM_FIELDS = ["protects", "from_whom", "adversary", "parties", "trust_assumptions",
              "guarantee_kind", "guarantee", "leaks", "protected_scope", "simulated", "notes"]


# ---------------------------------------------------------------- reading

def read_run_meta(run_dir: Path) -> dict:
    """run.json of a run folder, or {} when it is missing or torn."""
    path = RunFolder(run_dir).run_json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _numeric(results: pd.DataFrame) -> pd.DataFrame:
    df = results.copy()
    for col in ("value", "ci_low", "ci_high", "n"):
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("backend_id", "metric", "site", "label", "status", "error", "reference", "track"):
        if col not in df.columns:
            df[col] = None
    return df


def _index(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (backend_id, metric, site, label); a later row (a rerun) wins.

    Per-party / per-phase breakdown rows (party or phase set) are left out: every
    leaderboard number is a whole-backend figure.
    """
    df = _numeric(results)
    for col in ("party", "phase"):
        if col in df.columns:
            df = df[df[col].isna()]
    if df.empty:
        return df.set_index(["backend_id", "metric", "site", "label"])
    df = df.drop_duplicates(["backend_id", "metric", "site", "label"], keep="last")
    return df.set_index(["backend_id", "metric", "site", "label"]).sort_index()


def _get(idx: pd.DataFrame, bid: str, metric: str, site: str, label: str, col: str = "value") -> float:
    try:
        v = idx.at[(bid, metric, site, label), col]
    except KeyError:
        return float("nan")
    return float(v) if v is not None and not pd.isna(v) else float("nan")


def _first_seen(values: Iterable[Any]) -> list:
    out: list = []
    for v in values:
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v not in out:
            out.append(v)
    return out


def backend_order(results: pd.DataFrame, run_meta: dict | None = None) -> list[str]:
    """Run order of the backend configurations.

    run.json's `backends` dict is in run order, unless it was written with sorted keys
    (then its order says nothing): an alphabetical dict defers to the order in which
    backends first appear in results.jsonl, which is appended as they run. Backends
    known to only one of the two files are kept too.
    """
    meta_ids = [str(b) for b in ((run_meta or {}).get("backends") or {})]
    seen = [str(b) for b in _first_seen(results["backend_id"])] if "backend_id" in results.columns else []
    if len(meta_ids) > 1 and meta_ids == sorted(meta_ids) and seen:
        first, second = seen, meta_ids
    else:
        first, second = meta_ids, seen
    return first + [b for b in second if b not in first]


def threat_model(bid: str, results: pd.DataFrame, run_meta: dict | None = None) -> dict:
    """A backend's threat model from run.json, filled from its rows' tm_* fields."""
    tm = dict(((run_meta or {}).get("backends", {}).get(bid) or {}).get("threat_model") or {})
    if "backend_id" in results.columns:
        rows = results[results["backend_id"] == bid]
        for f in _TM_FIELDS:
            col = f"tm_{f}"
            if f not in tm and col in rows.columns:
                vals = [v for v in rows[col] if _present(v)]
                if vals:
                    tm[f] = vals[0]
    return tm


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    return True


def _as_list(v: Any) -> list:
    if not _present(v):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in v]
    return [str(v)]


def technique_of(backend_id: Any) -> str:
    """'mpc[engine=spu]' -> 'mpc': the backend a configuration belongs to."""
    return str(backend_id).split("[", 1)[0]


def _extra_rows(results: pd.DataFrame, bid: str, metrics: Iterable[str]) -> pd.DataFrame:
    """Whole-backend rows of `bid` with one of `metrics` (any phase, no party), numeric value."""
    df = results
    if "backend_id" not in df.columns or "metric" not in df.columns:
        return df.iloc[0:0]
    hit = df[(df["backend_id"] == bid) & df["metric"].isin(list(metrics))]
    if "party" in hit.columns:
        hit = hit[hit["party"].isna()]
    if "status" in hit.columns:
        hit = hit[hit["status"].isna() | (hit["status"] == "ok")]
    return hit


def extra_value(results: pd.DataFrame, bid: str, *metrics: str) -> float:
    """The last recorded value of the first of `metrics` that `bid` reported, NaN if none.
    A whole-run row wins over per-round ones (`round` qualifier: the curve, not the total)."""
    for metric in metrics:
        hit = _extra_rows(results, bid, [metric])
        if "round" in hit.columns and hit["round"].isna().any():
            hit = hit[hit["round"].isna()]
        vals = pd.to_numeric(hit["value"], errors="coerce").dropna() if len(hit) else []
        if len(vals):
            return float(vals.iloc[-1])
    return float("nan")


def privacy_level(results: pd.DataFrame, bid: str, tm: dict) -> str | float:
    """What one epsilon covers: the unit the private rows count (`n_train_private`, unit
    'patients' or 'images'), else the level a DP guarantee names ('site-level ...'); NaN for
    rows without a DP guarantee."""
    if tm.get("guarantee_kind") != "differential_privacy":
        return np.nan
    hit = _extra_rows(results, bid, ["n_train_private"])
    units = [str(u) for u in hit.get("unit", pd.Series(dtype=object)).dropna() if str(u)]
    if units:
        return units[-1].removesuffix("s")
    found = re.match(r"\s*([a-z]+)-level\b", str(tm.get("guarantee") or ""))
    return found.group(1) if found else np.nan


def fit_time_ratio(results: pd.DataFrame, bid: str, fit_time: float, ref_fit_time: float) -> float:
    """Training wall time over the control's: the harness's `fit_time_ratio` row, else the
    two fit times (a run recorded before that row existed)."""
    value = extra_value(results, bid, "fit_time_ratio")
    if math.isnan(value) and not (_nan(fit_time) or _nan(ref_fit_time)) and ref_fit_time > 0:
        value = float(fit_time) / float(ref_fit_time)
    return value


_PROJECTED = "projected_latency_per_image"


def projected_latencies(results: pd.DataFrame, bid: str) -> list[dict]:
    """Projected latencies per image of `bid`, one per network setting, in either row form:
    metric `projected_latency_per_image` with a `network` column (schema 2), or the older
    `projected_latency_per_image_<setting>` names. [{network, value, note}], last row wins."""
    if "metric" not in results.columns:
        return []
    mine = results[(results["backend_id"] == bid)
                   & results["metric"].astype(str).str.startswith(_PROJECTED)]
    if "party" in mine.columns:
        mine = mine[mine["party"].isna()]
    if "label" in mine.columns:
        mine = mine[mine["label"].isna() | (mine["label"] == NONE)]
    out: dict[str, dict] = {}
    for _, r in mine.iterrows():
        metric = str(r["metric"])
        net = r.get("network") if _present(r.get("network")) else metric[len(_PROJECTED):].strip("_")
        value = pd.to_numeric(r.get("value"), errors="coerce")
        if pd.isna(value):
            continue
        out[str(net or "projected")] = {"network": str(net or "projected"), "value": float(value),
                                         "note": r.get("note") if _present(r.get("note")) else ""}
    return list(out.values())


def cpu_per_image(results: pd.DataFrame, bid: str, latency: float) -> tuple[float, str]:
    """(CPU-seconds per image, where it comes from): the parties' measured CPU time summed
    when a backend reports it per party, else the measured latency of its one process."""
    if "metric" in results.columns and "party" in results.columns:
        rows = results[(results["backend_id"] == bid) & (results["metric"] == "party_cpu_time_per_image")
                       & results["party"].notna()]
        vals = pd.to_numeric(rows.drop_duplicates("party", keep="last")["value"], errors="coerce").dropna()
        if len(vals):
            return float(vals.sum()), f"measured CPU time of {len(vals)} parties"
    if not _nan(latency):
        return float(latency), "wall-clock latency of one process (upper bound on its CPU time)"
    return float("nan"), ""


# ---------------------------------------------------------------- tables

def build_leaderboard(results: pd.DataFrame, run_meta: dict | None = None) -> pd.DataFrame:
    """One row per backend configuration, in run order; missing values stay NaN."""
    run_meta = run_meta or {}
    results = _numeric(results)
    idx = _index(results)
    label_names = list((run_meta.get("dataset") or {}).get("label_names") or [])
    rows = []
    for bid in backend_order(results, run_meta):
        meta = (run_meta.get("backends") or {}).get(bid) or {}
        mine = results[results["backend_id"] == bid]
        tm = threat_model(bid, results, run_meta)

        status = meta.get("status")
        if not status:
            st = _first_seen(mine["status"])
            status = "failed" if "failed" in st else (st[0] if st else "pending")
        error = meta.get("error")
        if not _present(error):
            errs = _first_seen(mine["error"])
            error = errs[0] if errs else np.nan
        reference = meta.get("reference") if "reference" in meta else None
        if not _present(reference):
            refs = _first_seen(mine["reference"])
            reference = refs[0] if refs else np.nan
        track = meta.get("track") or (_first_seen(mine["track"]) or [np.nan])[0]

        n_images = _get(idx, bid, "n_images", ALL, NONE)
        if math.isnan(n_images) and meta.get("n_images") is not None:
            n_images = float(meta["n_images"])

        p_rows = mine[(mine["metric"] == "delong_p") & (mine["site"] == ALL)
                      & ~mine["label"].isin(_NOT_A_LABEL)]
        if label_names:
            p_rows = p_rows[p_rows["label"].isin(label_names)]
        min_p = float(p_rows["value"].min()) if p_rows["value"].notna().any() else np.nan

        latency = _get(idx, bid, "latency_per_image_p50", ALL, NONE)
        projected = {p["network"]: p["value"] for p in projected_latencies(results, bid)}
        cpu, cpu_source = cpu_per_image(results, bid, latency)
        row = {
            "backend_id": bid,
            "technique": technique_of(bid),
            "track": track,
            "protects": ", ".join(_as_list(tm.get("protects"))),
            "from_whom": tm.get("from_whom", np.nan),
            "trust": "; ".join(_as_list(tm.get("trust_assumptions"))) or np.nan,
            "guarantee": tm.get("guarantee", np.nan),
            "simulated": bool(tm.get("simulated", False)),
            "status": status,
            "n_images": n_images,
            "auroc_macro": _get(idx, bid, "auroc", ALL, MACRO),
            "auroc_macro_ci_low": _get(idx, bid, "auroc", ALL, MACRO, "ci_low"),
            "auroc_macro_ci_high": _get(idx, bid, "auroc", ALL, MACRO, "ci_high"),
            "delta_auroc_macro": _get(idx, bid, "auroc_delta", ALL, MACRO),
            "delta_ci_low": _get(idx, bid, "auroc_delta", ALL, MACRO, "ci_low"),
            "delta_ci_high": _get(idx, bid, "auroc_delta", ALL, MACRO, "ci_high"),
            "min_delong_p": min_p,
            "reference": reference,
            "max_abs_diff": _get(idx, bid, "max_abs_diff", ALL, ALL),
            **{c: _get(idx, bid, c, ALL, NONE) for c in _COST_COLUMNS},
            "projected_latency_lan": projected.get("lan", np.nan),
            "projected_latency_wan": projected.get("wan", np.nan),
            "cpu_per_image": cpu, "cpu_source": cpu_source or np.nan,
            "epsilon": extra_value(results, bid, "epsilon", "dp_epsilon"),
            "dp_delta": extra_value(results, bid, "delta", "dp_delta"),
            "privacy_level": privacy_level(results, bid, tm),
            "training_rounds": extra_value(results, bid, "training_rounds"),
            "mia_auroc": extra_value(results, bid, "mia_auroc"),
            "protected_scope": tm.get("protected_scope", np.nan),
            "error": error,
        }
        rows.append(row)
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    training = board["track"] == "training"
    # a training row's max |Δp| would compare two different models (the row and its control):
    # not a fidelity figure, so the training track does not show it
    board.loc[training, "max_abs_diff"] = np.nan
    fit = dict(zip(board["backend_id"], board["fit_time"]))
    board["fit_time_ratio"] = [
        fit_time_ratio(results, r.backend_id, r.fit_time, fit.get(r.reference, np.nan))
        if t else np.nan for r, t in zip(board.itertuples(), training)]
    return board


def _labels_in(df: pd.DataFrame) -> list[str]:
    return [lab for lab in _first_seen(df["label"]) if lab not in _NOT_A_LABEL]


def per_label_table(results: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Rows backend_id x label (macro last), pooled site: AUROC with CI, paired delta with CI, DeLong p."""
    df = _numeric(results)
    idx = _index(df)
    order = order or backend_order(df)
    auc = df[(df["metric"] == "auroc") & (df["site"] == ALL)]
    labels = _labels_in(auc) + ([MACRO] if (auc["label"] == MACRO).any() else [])
    rows = []
    for bid in order:
        for lab in labels:
            if (bid, "auroc", ALL, lab) not in idx.index:
                continue
            rows.append({
                "backend_id": bid, "label": lab,
                "auroc": _get(idx, bid, "auroc", ALL, lab),
                "ci_low": _get(idx, bid, "auroc", ALL, lab, "ci_low"),
                "ci_high": _get(idx, bid, "auroc", ALL, lab, "ci_high"),
                "n": _get(idx, bid, "auroc", ALL, lab, "n"),
                "auroc_delta": _get(idx, bid, "auroc_delta", ALL, lab),
                "delta_ci_low": _get(idx, bid, "auroc_delta", ALL, lab, "ci_low"),
                "delta_ci_high": _get(idx, bid, "auroc_delta", ALL, lab, "ci_high"),
                "delong_p": _get(idx, bid, "delong_p", ALL, lab),
            })
    cols = ["backend_id", "label", "auroc", "ci_low", "ci_high", "n", "auroc_delta",
            "delta_ci_low", "delta_ci_high", "delong_p"]
    return pd.DataFrame(rows, columns=cols)


def per_site_table(results: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Rows backend_id x site (pooled __all__ last): macro AUROC with CI and per-label AUROC with CI.

    Per-label columns are `auroc_<label>`, `auroc_<label>_ci_low`, `auroc_<label>_ci_high`.
    """
    df = _numeric(results)
    idx = _index(df)
    order = order or backend_order(df)
    auc = df[df["metric"] == "auroc"]
    sites = [s for s in _first_seen(auc["site"]) if s != ALL] + ([ALL] if (auc["site"] == ALL).any() else [])
    labels = _labels_in(auc)
    cols = ["backend_id", "site", "auroc_macro", "auroc_macro_ci_low", "auroc_macro_ci_high", "n"]
    for lab in labels:
        cols += [f"auroc_{lab}", f"auroc_{lab}_ci_low", f"auroc_{lab}_ci_high"]
    rows = []
    for bid in order:
        for site in sites:
            if not any((bid, "auroc", site, lab) in idx.index for lab in labels + [MACRO]):
                continue
            row = {
                "backend_id": bid, "site": site,
                "auroc_macro": _get(idx, bid, "auroc", site, MACRO),
                "auroc_macro_ci_low": _get(idx, bid, "auroc", site, MACRO, "ci_low"),
                "auroc_macro_ci_high": _get(idx, bid, "auroc", site, MACRO, "ci_high"),
                "n": _get(idx, bid, "auroc", site, MACRO, "n"),
            }
            for lab in labels:
                row[f"auroc_{lab}"] = _get(idx, bid, "auroc", site, lab)
                row[f"auroc_{lab}_ci_low"] = _get(idx, bid, "auroc", site, lab, "ci_low")
                row[f"auroc_{lab}_ci_high"] = _get(idx, bid, "auroc", site, lab, "ci_high")
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- formatting

DASH = "–"


def _nan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def format_ci(value: Any, low: Any = None, high: Any = None, digits: int = 3, signed: bool = False) -> str:
    """'0.842 [0.801, 0.880]'; the CI is left out when unknown, '–' when the value is."""
    if _nan(value):
        return DASH
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = f.format(float(value))
    if not _nan(low) and not _nan(high):
        text += f" [{f.format(float(low))}, {f.format(float(high))}]"
    return text


def format_p(p: Any) -> str:
    if _nan(p):
        return DASH
    p = float(p)
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_bytes(b: Any) -> str:
    """Decimal units: 1 KB = 1000 B."""
    if _nan(b):
        return DASH
    b = float(b)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def format_seconds(s: Any) -> str:
    if _nan(s):
        return DASH
    s = float(s)
    a = abs(s)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if a < 1:
        return f"{s * 1e3:.3g} ms"
    if a < 120:
        return f"{s:.3g} s"
    if a < 7200:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def format_small(v: Any) -> str:
    """Probabilities differences that may be 0 or 1e-7: two significant digits."""
    if _nan(v):
        return DASH
    v = float(v)
    if v == 0:
        return "0"
    return f"{v:.2g}" if 1e-3 <= abs(v) < 1e3 else f"{v:.1e}"


def format_count(v: Any) -> str:
    if _nan(v):
        return DASH
    v = float(v)
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def format_value(value: Any, unit: str | None) -> str:
    """A number in its metric's unit (from suite.metrics or a row's `unit`)."""
    unit = unit or ""
    if unit == "s":
        return format_seconds(value)
    if unit == "bytes":
        return format_bytes(value)
    if _nan(value):
        return DASH
    v = float(value)
    if unit in ("", "probability", "fraction"):
        return format_small(v) if (v != 0 and abs(v) < 1e-3) else f"{v:.4g}"
    return f"{v:.4g} {unit}"


def _delta_with_p(row: pd.Series) -> str:
    text = format_ci(row.get("delta_auroc_macro"), row.get("delta_ci_low"), row.get("delta_ci_high"),
                     signed=True)
    if not _nan(row.get("min_delong_p")):
        text += f" (p={format_p(row['min_delong_p'])})"
    return text


def _text(v: Any) -> str:
    return "" if not _present(v) else str(v)


# ---------------------------------------------------------------- markdown

def _md_cell(v: Any) -> str:
    return _text(v).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _footnote_id(bid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", str(bid))


def threat_model_line(tm: dict) -> str:
    """One line: protects / from whom / adversary / trust / leaks / protected scope."""
    protects = ", ".join(_as_list(tm.get("protects"))) or "nothing"
    parts = [
        f"protects {protects} from {_text(tm.get('from_whom')) or '?'}",
        f"adversary: {_text(tm.get('adversary')) or '?'}",
        f"trust: {'; '.join(_as_list(tm.get('trust_assumptions'))) or DASH}",
        f"guarantee: {_text(tm.get('guarantee')) or DASH}",
        f"leaks: {'; '.join(_as_list(tm.get('leaks'))) or DASH}",
        f"protected scope: {_text(tm.get('protected_scope')) or DASH}",
    ]
    if tm.get("simulated"):
        parts.append("SIMULATED" + (f" ({tm['notes']})" if tm.get("notes") else ""))
    return "; ".join(parts)


def split_tracks(board: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(inference rows incl. references, training rows): each track has its own columns."""
    training = board["track"] == "training"
    return board[~training], board[training]


def guarantee_keys(board: pd.DataFrame, results: pd.DataFrame, run_meta: dict | None = None
                   ) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """Footnote number per backend and the footnotes: configurations with the same threat
    model share one note, so the guarantee text is written once, below the table."""
    keys: dict[str, int] = {}
    notes: list[tuple[int, str]] = []
    by_text: dict[str, int] = {}
    for bid in board["backend_id"]:
        text = threat_model_line(threat_model(bid, results, run_meta))
        if text not in by_text:
            by_text[text] = len(by_text) + 1
            notes.append((by_text[text], text))
        keys[bid] = by_text[text]
    return keys, notes


def times_reference(value: Any, ref: Any) -> str:
    """'×214' when both are positive, else '–'."""
    if _nan(value) or _nan(ref) or float(ref) <= 0 or float(value) <= 0:
        return DASH
    x = float(value) / float(ref)
    if x < 0.01:
        return "<×0.01"
    return f"×{x:.2g}" if x < 10 else f"×{x:,.0f}"


def plaintext_latency(board: pd.DataFrame) -> float:
    """Median latency per image of the plaintext reference (the unit of every '×' figure)."""
    hit = board[(board["technique"] == "plaintext") & (board["status"] == "ok")]
    return float(hit["latency_per_image_p50"].iloc[0]) if len(hit) else float("nan")


def reference_value(board: pd.DataFrame, row: pd.Series, column: str) -> float:
    """`column` of the row's own reference configuration (NaN without one)."""
    ref = row.get("reference")
    if not _present(ref):
        return float("nan")
    hit = board[board["backend_id"] == ref]
    return float(hit[column].iloc[0]) if len(hit) and not _nan(hit[column].iloc[0]) else float("nan")


def format_epsilon(eps: Any, delta: Any = None, level: Any = None) -> str:
    """'2.97 (δ=1.0e-05, patient)': epsilon, its delta and the unit it covers."""
    if _nan(eps):
        return DASH
    text = "∞" if math.isinf(float(eps)) else f"{float(eps):.3g}"
    qualifiers = ([f"δ={float(delta):.1e}"] if not _nan(delta) else []) + \
                 ([str(level)] if _present(level) else [])
    if qualifiers:
        text += f" ({', '.join(qualifiers)})"
    return text


def format_ratio(x: Any) -> str:
    """'×1.3' for a ratio of two measured times, '–' when unknown."""
    if _nan(x) or float(x) <= 0:
        return DASH
    return f"×{float(x):.2g}" if float(x) < 10 else f"×{float(x):,.0f}"


@dataclass(frozen=True)
class TrainingColumn:
    """One of the columns every training table leads with: its header, the leaderboard
    column it shows (also its sort key), and how its cell reads."""

    header: str
    column: str
    text: Callable[[pd.Series], str]


TRAINING_COLUMNS = (
    TrainingColumn("time", "fit_time", lambda r: format_seconds(r.get("fit_time"))),
    TrainingColumn("× ctrl", "fit_time_ratio", lambda r: format_ratio(r.get("fit_time_ratio"))),
    TrainingColumn("comm", "fit_bytes",
                   lambda r: format_bytes(r.get("fit_bytes")) if r.get("fit_bytes") else DASH),
    TrainingColumn("ε (δ, level)", "epsilon",
                   lambda r: format_epsilon(r.get("epsilon"), r.get("dp_delta"), r.get("privacy_level"))),
    TrainingColumn("rounds", "training_rounds", lambda r: format_count(r.get("training_rounds"))),
)
TRAINING_HEADERS = [c.header for c in TRAINING_COLUMNS]


def training_cells(r: pd.Series) -> list[str]:
    """What a training row costs and guarantees, in the order every training table (the
    terminal, leaderboard.md, the HTML report) leads with: training time, × its control's,
    training bytes, ε (δ, level), rounds."""
    return [c.text(r) for c in TRAINING_COLUMNS]


def training_sort_keys(r: pd.Series) -> list[float]:
    """The numbers behind `training_cells` (NaN where unknown), for sortable tables."""
    out = []
    for c in TRAINING_COLUMNS:
        try:
            out.append(float(r.get(c.column)))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


MD_WIDTH = 100     # leaderboard.md prose and footnotes wrap here (tables cannot)


def _wrap(text: str, indent: str = "") -> list[str]:
    import textwrap

    return textwrap.wrap(text, MD_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [""]


def _md_name(r: pd.Series, key: int) -> str:
    name = f"{r['backend_id']}" + (" *(simulated)*" if r["simulated"] else "")
    return name + f" [^{key}]"


def _md_auroc(r: pd.Series) -> list[str]:
    ok = r["status"] == "ok"
    return [format_ci(r["auroc_macro"], r["auroc_macro_ci_low"], r["auroc_macro_ci_high"]) if ok
            else f"**{str(r['status']).upper()}**",
            _delta_with_p(r) if not _nan(r["delta_auroc_macro"]) else DASH]


def leaderboard_markdown(board: pd.DataFrame, results: pd.DataFrame, run_meta: dict | None = None) -> str:
    """Two narrow tables (inference, training) that read on GitHub; guarantees as footnotes."""
    run_meta = run_meta or {}
    ds = run_meta.get("dataset") or {}
    model = run_meta.get("model") or {}
    lines = [f"# Leaderboard — run {run_meta.get('run_id', '?')}", ""]
    facts = [f"dataset **{ds.get('name', '?')}** ({format_count(ds.get('n_test'))} test images)",
             f"model **{model.get('name', '?')}**", f"seed {run_meta.get('seed', '?')}",
             f"git {str(run_meta.get('git_sha') or '?')[:12]}"]
    lines += _wrap(", ".join(facts) + ".") + [""]
    lines += _wrap("Macro AUROC and ΔAUROC (vs the row's reference, paired) with 95% CIs on pooled "
                   "sites; p is the smallest per-label paired DeLong p. *(simulated)* marks a "
                   "backend whose protection is simulated, not real. × = multiple of the plaintext "
                   "reference's latency (inference). Training rows: training time (the fit phase), "
                   "× ctrl = that over the row's control's (same training budget; ΔAUROC is vs "
                   "the control too), comm = bytes sent while training, ε (δ, level) = the unit "
                   "one ε covers (patient, image, site), attack = membership-inference AUROC. Bytes in decimal units "
                   "(1 KB = 1000 B). What each row protects, from whom and on which assumptions "
                   "is in its footnote.") + [""]
    keys, notes = guarantee_keys(board, results, run_meta)
    plain = plaintext_latency(board)
    inference, training = split_tracks(board)
    if len(inference):
        lines += ["## Inference track", ""]
        lines += _md_table(
            ["backend", "macro AUROC [95% CI]", "ΔAUROC [95% CI] (p)", "latency/img", "×", "comm/img"],
            [[_md_name(r, keys[r["backend_id"]]), *_md_auroc(r),
              format_seconds(r["latency_per_image_p50"]), times_reference(r["latency_per_image_p50"], plain),
              format_bytes(r["bytes_per_image"])]
             for _, r in inference.iterrows()])
        lines += [""]
    if len(training):
        lines += ["## Training track", ""]
        lines += _md_table(
            ["backend", *TRAINING_HEADERS, "AUROC [95% CI]", "ΔAUROC (p)", "attack"],
            [[_md_name(r, keys[r["backend_id"]]), *training_cells(r), *_md_auroc(r),
              format_value(r["mia_auroc"], "")]
             for _, r in training.iterrows()])
        lines += [""]

    failed = board[board["status"] != "ok"]
    if len(failed):
        lines += ["## Not ok", ""]
        for _, r in failed.iterrows():
            lines += _wrap(f"- **{r['backend_id']}** ({r['status']}): "
                           f"{_text(r['error']) or 'no error recorded'}", indent="  ")
        lines += [""]

    order = list(board["backend_id"])
    pl = per_label_table(results, order)
    if len(pl):
        lines += ["<details><summary>Per-label AUROC (pooled sites)</summary>", ""]
        lines += _md_table(
            ["backend", "label", "AUROC [95% CI]", "n", "ΔAUROC [95% CI]", "DeLong p"],
            [[r["backend_id"], "macro" if r["label"] == MACRO else r["label"],
              format_ci(r["auroc"], r["ci_low"], r["ci_high"]), format_count(r["n"]),
              format_ci(r["auroc_delta"], r["delta_ci_low"], r["delta_ci_high"], signed=True),
              format_p(r["delong_p"])] for _, r in pl.iterrows()])
        lines += ["", "</details>", ""]
    ps = per_site_table(results, order)
    if len(ps):
        sites = list(dict.fromkeys(ps["site"]))
        lines += ["<details><summary>Per-site macro AUROC</summary>", ""]
        grid = ps.pivot_table(index="backend_id", columns="site", values="auroc_macro", aggfunc="last")
        lines += _md_table(
            ["backend"] + ["pooled" if s == ALL else s for s in sites],
            [[bid] + [f"{grid.at[bid, s]:.3f}" if s in grid.columns and not _nan(grid.at[bid, s]) else DASH
                      for s in sites] for bid in order if bid in grid.index])
        lines += ["", "</details>", ""]

    lines += ["## Threat models", ""]
    owners: dict[int, list[str]] = {}
    for bid, k in keys.items():
        owners.setdefault(k, []).append(bid)
    for k, text in notes:   # continuation lines indented: they stay in the footnote
        lines += _wrap(f"[^{k}]: **{', '.join(owners[k])}** — {text}", indent="    ")
    return "\n".join(lines) + "\n"


def write_leaderboard(run_dir: Path) -> pd.DataFrame:
    """Read run.json + results.jsonl; write leaderboard.csv and leaderboard.md; return the table."""
    run_dir = Path(run_dir)
    run_meta = read_run_meta(run_dir)
    results = read_results(RunFolder(run_dir).results)
    board = build_leaderboard(results, run_meta)
    board.to_csv(RunFolder(run_dir).leaderboard_csv, index=False)
    RunFolder(run_dir).leaderboard_md.write_text(leaderboard_markdown(board, results, run_meta), encoding="utf-8")
    return board


# ---------------------------------------------------------------- terminal

_SHORT_ASSET = {"input_images": "images", "model_weights": "weights",
                "training_membership": "membership", "predictions": "predictions"}
NARROW_WIDTH = 100


def terminal_width(console) -> int:
    """Columns to fit: $COLUMNS when set (a pipe or CI log says how wide it is read),
    else the console's own width; never more than the console allows."""
    import os

    try:
        cols = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        cols = 0
    width = console.width
    if cols > 0:
        width = min(width, cols) if console.is_terminal else cols
    elif not console.is_terminal:
        width = min(width, NARROW_WIDTH)
    return max(40, width)


def _short_protects(r: pd.Series) -> str:
    return ", ".join(_SHORT_ASSET.get(a.strip(), a.strip())
                     for a in _text(r.get("protects")).split(",") if a.strip()) or "nothing"


def print_leaderboard(df: pd.DataFrame, console=None, wide: bool = False,
                      results: pd.DataFrame | None = None, run_meta: dict | None = None) -> None:
    """The leaderboard in the terminal: one table per track that fits the terminal (at most
    $COLUMNS, 100 on a pipe), each guarantee as a numbered footnote below it. `wide=True`
    prints every column, guarantee included, whatever the width."""
    from rich.console import Console

    console = console or Console()
    if wide:
        _print_wide(df, console)
    else:
        _print_narrow(df, console, terminal_width(console), results, run_meta)
    for _, r in df[df["status"] != "ok"].iterrows():
        console.print(f"{r['backend_id']} {r['status']}: {_text(r.get('error')) or 'no error recorded'}",
                      markup=False, highlight=False, width=None if wide else terminal_width(console),
                      style="red")


def _auroc_cell(r: pd.Series, ci: bool) -> str:
    from rich.markup import escape

    if r.get("status") != "ok":
        return f"[red]{escape(str(r.get('status')).upper())}[/]"
    if ci:
        return format_ci(r["auroc_macro"], r["auroc_macro_ci_low"], r["auroc_macro_ci_high"])
    return format_ci(r["auroc_macro"])


def _delta_cell(r: pd.Series) -> str:
    return format_ci(r.get("delta_auroc_macro"), r.get("delta_ci_low"), r.get("delta_ci_high"), signed=True)


def _print_narrow(df: pd.DataFrame, console, width: int, results: pd.DataFrame | None,
                  run_meta: dict | None) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if results is not None:
        keys, notes = guarantee_keys(df, results, run_meta)
    else:
        keys, notes, seen = {}, [], {}
        for _, r in df.iterrows():
            text = f"protects {_short_protects(r)} from {_text(r.get('from_whom')) or '?'}; " \
                   f"guarantee: {_text(r.get('guarantee')) or DASH}"
            if text not in seen:
                seen[text] = len(seen) + 1
                notes.append((seen[text], text))
            keys[r["backend_id"]] = seen[text]
    plain = plaintext_latency(df)
    num = {"justify": "right", "no_wrap": True}
    inference, training = split_tracks(df)

    def name(r):
        text = escape(str(r["backend_id"])) + (" [yellow](sim)[/]" if r.get("simulated") else "")
        return text + f" [dim]\\[{keys.get(r['backend_id'], '?')}][/]"

    tables = []
    if len(inference):
        t = Table(title="Inference track", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for col, kw in (("backend [note]", {"ratio": 1, "overflow": "fold"}), ("AUROC", num),
                        ("ΔAUROC [95% CI]", num), ("p", num), ("latency/img", num), ("×plain", num),
                        ("comm/img", num)):
            t.add_column(col, **kw)
        for _, r in inference.iterrows():
            t.add_row(name(r), _auroc_cell(r, ci=False), _delta_cell(r), format_p(r.get("min_delong_p")),
                      format_seconds(r.get("latency_per_image_p50")),
                      times_reference(r.get("latency_per_image_p50"), plain), format_bytes(r.get("bytes_per_image")))
        tables.append(t)
    if len(training):
        t = Table(title="Training track", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        t.add_column("backend [note]", ratio=1, overflow="fold")
        for col in TRAINING_HEADERS:   # the one definition of the training columns
            # ε (δ, level) wraps at its spaces on a narrow terminal
            t.add_column(col, **(num if col != "ε (δ, level)" else
                                 {"justify": "right", "min_width": 6, "overflow": "fold"}))
        for col in ("AUROC", "ΔAUROC", "attack"):   # Δ vs the control (the note below)
            t.add_column(col, **num)
        for _, r in training.iterrows():   # AUROC and ΔAUROC without CIs here (in leaderboard.md)
            t.add_row(name(r), *(escape(c) for c in training_cells(r)), _auroc_cell(r, ci=False),
                      format_ci(r.get("delta_auroc_macro"), signed=True),
                      DASH if _nan(r.get("mia_auroc")) else f"{float(r['mia_auroc']):.3f}")
        tables.append(t)
    for t in tables:
        console.print(t, width=width)
    if tables:
        console.print("ΔAUROC vs each row's reference, paired; p = smallest per-label DeLong p; "
                      "×plain = latency / plaintext's; training: time and bytes (comm) of training, "
                      "× ctrl = time / its control's, ε (δ, level) = unit one ε covers, attack = "
                      "membership-inference AUROC on the released model.",
                      markup=False, highlight=False, width=width, style="dim")
    for k, text in notes:
        console.print(f"[{k}] {text}", markup=False, highlight=False, width=width)


def _print_wide(df: pd.DataFrame, console) -> None:
    """Every column in one table, guarantee included (`--wide`)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Leaderboard", header_style="bold", box=box.HEAVY_HEAD)
    num = {"justify": "right", "no_wrap": True}
    columns = [("backend", {"no_wrap": True}), ("track", {}), ("protects", {}),
               ("macro AUROC [95% CI]", num), ("ΔAUROC (p)", num), ("max|Δp|", num), ("latency/img", num),
               ("WAN (proj.)", num), ("comm/img", num), ("ε (level)", num), ("fit (×ctrl)", num),
               ("training comm", num), ("rounds", num),
               ("guarantee", {"min_width": 12, "ratio": 1})]
    for col, kw in columns:
        table.add_column(col, **kw)
    for _, r in df.iterrows():
        delta = DASH
        if not _nan(r.get("delta_auroc_macro")):
            delta = f"{float(r['delta_auroc_macro']):+.3f}"
            if not _nan(r.get("min_delong_p")):
                delta += f" (p={format_p(r['min_delong_p'])})"
        table.add_row(
            escape(str(r["backend_id"])) + (" [yellow](sim)[/]" if r.get("simulated") else ""),
            escape(_text(r.get("track"))), escape(_short_protects(r)), _auroc_cell(r, ci=True), delta,
            format_small(r.get("max_abs_diff")), format_seconds(r.get("latency_per_image_p50")),
            format_seconds(r.get("projected_latency_wan")), format_bytes(r.get("bytes_per_image")),
            format_epsilon(r.get("epsilon"), None, r.get("privacy_level")),
            format_seconds(r.get("fit_time")) + ("" if _nan(r.get("fit_time_ratio"))
                                                 else f" ({format_ratio(r.get('fit_time_ratio'))})"),
            format_bytes(r.get("fit_bytes")) if r.get("fit_bytes") else DASH,
            format_count(r.get("training_rounds")), escape(_text(r.get("guarantee"))))
    console.print(table, width=max(console.width, 200))
