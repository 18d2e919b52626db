"""The first screen: one line per technique, what it protects at what price.

A decision-maker asks "which technique, at what price, protecting what from whom";
this module answers from the leaderboard alone: per technique its representative
configuration (the first one, in run order, that finished and protects something),
the threat model in a few words, ΔAUROC against its reference, cost as multiples of
plaintext, and what validating 1,000 images would cost at stated prices.

Prices are report options (`ReportOptions`), not facts of the run: they are printed next
to every cost figure so a reader can redo the sum with their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd

from suite.leaderboard import (
    DASH,
    format_bytes,
    format_ci,
    format_epsilon,
    format_p,
    format_ratio,
    format_seconds,
    plaintext_latency,
)

__all__ = ["ReportOptions", "summary_lines", "cost_of_images", "representative"]


@dataclass(frozen=True)
class ReportOptions:
    """Prices and sizes behind the report's cost figures (a `[report]` config section may set them).

    Defaults are public on-demand list prices of late 2025, rounded: one vCPU-hour of a
    general-purpose cloud VM (about 0.04-0.05 USD) and internet egress from a large cloud
    (about 0.09 USD per GB for the first 10 TB a month).
    """

    cpu_hour_usd: float = 0.05          # price of one CPU-hour (vCPU)
    egress_usd_per_gb: float = 0.09     # price of one GB (1e9 bytes) leaving a party's network
    images: int = 1000                  # the validation workload the cost line is for
    currency: str = "USD"

    @classmethod
    def from_dict(cls, data: dict | None) -> "ReportOptions":
        """Options from a mapping (e.g. a `[report]` TOML table); an unknown key is an error."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ValueError(f"unknown report option(s) {bad}; known: {sorted(known)}")
        return cls(**data)

    def describe(self) -> str:
        return (f"{self.currency} {self.cpu_hour_usd:g} per CPU-hour, {self.currency} "
                f"{self.egress_usd_per_gb:g} per GB on the wire")


def _nan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def cost_of_images(row: pd.Series, options: ReportOptions) -> dict:
    """Cost of validating `options.images` images with one configuration.

    CPU: CPU-seconds per image (all parties) x images x price per CPU-hour / 3600.
    Wire: bytes per image sent by all parties (each byte leaves one party) x images x
    price per GB. Training-track rows have no per-image cost and give NaN.
    """
    n = options.images
    cpu, wire = row.get("cpu_per_image"), row.get("bytes_per_image")
    cpu_usd = float(cpu) * n * options.cpu_hour_usd / 3600 if not _nan(cpu) else float("nan")
    wire_usd = float(wire) * n * options.egress_usd_per_gb / 1e9 if not _nan(wire) else float("nan")
    total = cpu_usd + (0.0 if _nan(wire_usd) else wire_usd) if not _nan(cpu_usd) else float("nan")
    return {"cpu_usd": cpu_usd, "wire_usd": wire_usd, "total_usd": total,
            "cpu_source": row.get("cpu_source") if isinstance(row.get("cpu_source"), str) else ""}


def format_money(v: Any, currency: str = "USD") -> str:
    if _nan(v):
        return DASH
    v = float(v)
    sym = "$" if currency == "USD" else currency + " "
    if v == 0:
        return f"{sym}0"
    if v < 0.01:
        return f"{sym}{v:.1e}"
    return f"{sym}{v:,.2f}" if v < 1000 else f"{sym}{v:,.0f}"


def representative(rows: pd.DataFrame) -> pd.Series:
    """A technique's line: its first finished configuration that protects something, else
    its first finished one, else its first one (run order is the configured default first)."""
    ok = rows[rows["status"] == "ok"]
    protecting = ok[ok["protects"].fillna("").astype(str) != ""]
    for candidates in (protecting, ok, rows):
        if len(candidates):
            return candidates.iloc[0]
    raise ValueError("a technique without configurations")


def _times(value: Any, unit: Any) -> tuple[str, float]:
    if _nan(value) or _nan(unit) or float(unit) <= 0 or float(value) <= 0:
        return DASH, float("nan")
    x = float(value) / float(unit)
    return (f"×{x:.2g}" if x < 10 else f"×{x:,.0f}"), x


def _few_words(text: Any, limit: int = 60) -> str:
    text = "" if not isinstance(text, str) else text
    return text if len(text) <= limit else text[: limit - 1].rstrip(" ;,") + "…"


def summary_lines(board: pd.DataFrame, options: ReportOptions | None = None) -> list[dict]:
    """One dict per technique (run order) for the first screen."""
    options = options or ReportOptions()
    plain = plaintext_latency(board)
    out = []
    for tech in dict.fromkeys(board["technique"]):
        rows = board[board["technique"] == tech]
        r = representative(rows)
        inference = r["track"] != "training"    # a training row's cost is its training, not serving
        lat_x, lat_mult = _times(r["latency_per_image_p50"], plain) if inference else (DASH, float("nan"))
        fit_x = format_ratio(r["fit_time_ratio"])   # the leaderboard's "× ctrl", one definition
        cost = cost_of_images(r, options) if r["track"] != "training" else {
            "cpu_usd": float("nan"), "wire_usd": float("nan"), "total_usd": float("nan"), "cpu_source": ""}
        delta = DASH
        if not _nan(r["delta_auroc_macro"]):
            delta = format_ci(r["delta_auroc_macro"], r["delta_ci_low"], r["delta_ci_high"], signed=True)
        protects = str(r["protects"] or "").replace("_", " ")
        out.append({
            "technique": tech, "backend_id": r["backend_id"], "n_configs": len(rows),
            "track": r["track"], "status": r["status"], "simulated": bool(r["simulated"]),
            "protects": protects or "nothing",
            "from_whom": r["from_whom"] if isinstance(r["from_whom"], str) else DASH,
            "trust": _few_words(r["trust"]) or DASH, "trust_full": r["trust"] if isinstance(r["trust"], str) else "",
            "guarantee": r["guarantee"] if isinstance(r["guarantee"], str) else "",
            "delta": delta, "p": format_p(r["min_delong_p"]), "reference": r["reference"] if isinstance(r["reference"], str) else "",
            "latency": format_seconds(r["latency_per_image_p50"]) if inference else DASH, "latency_x": lat_x, "latency_mult": lat_mult,
            "wan": format_seconds(r["projected_latency_wan"]) if not _nan(r["projected_latency_wan"]) else "",
            "bytes": format_bytes(r["bytes_per_image"]) if r["track"] != "training" else DASH,
            "fit": format_seconds(r["fit_time"]), "fit_x": fit_x,
            "epsilon": format_epsilon(r["epsilon"]) if not _nan(r["epsilon"]) else "",
            "cost": format_money(cost["total_usd"], options.currency),
            "cost_cpu": format_money(cost["cpu_usd"], options.currency),
            "cost_wire": format_money(cost["wire_usd"], options.currency),
            "cost_source": cost["cpu_source"],
        })
    return out
