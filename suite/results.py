"""Tidy result rows, appended as JSON lines and never rewritten.

One row per backend configuration x dataset x site x label x metric. Pooled rows use
site ALL; rows that belong to no label (latency, bytes) use label NONE; macro
averages use label MACRO. Predictions are stored per image so every metric can be
recomputed later (`suite report`) without re-running a backend.

Run folder layout:
  run.json              run metadata, config, per-backend threat model and status
  results.jsonl         metric rows (this module)
  predictions.parquet   backend_id, backend, dataset, image_id, site, label, y_true, prob
  parts/                per-backend predictions and timings, written as each finishes
  leaderboard.csv / leaderboard.md / report.html
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from suite import SCHEMA_VERSION

ALL = "__all__"        # site value of pooled rows
NONE = "__none__"      # label value of rows that belong to no label
MACRO = "__macro__"    # label value of macro averages over labels

RESULT_COLUMNS = [
    "schema_version", "run_id", "git_sha", "config_hash", "seed", "suite_version",
    "backend", "backend_id", "track", "reference", "dataset", "site", "label", "metric",
    "value", "ci_low", "ci_high", "ci_method", "n", "unit", "higher_is_better",
    "status", "error", "note", "party", "phase", "network", "estimate", "round", "artifact",
]


@dataclass
class ResultRow:
    backend: str
    backend_id: str
    track: str
    dataset: str
    metric: str
    value: float | None
    unit: str
    higher_is_better: bool | None
    site: str = ALL
    label: str = NONE
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str | None = None
    n: int | None = None
    reference: str | None = None     # backend_id compared against, for paired metrics
    status: str = "ok"               # ok | failed | skipped
    error: str | None = None
    note: str | None = None
    party: str | None = None         # per-party traffic rows: which party
    phase: str | None = None         # setup | fit | online | audit, where it matters
    network: str | None = None       # network profile of a projection (lan | wan)
    estimate: str = "measured"       # measured | projected | simulated
    round: int | None = None         # training round (federated curves), where it matters
    artifact: str | None = None      # a file of the run folder this row describes (RunFolder.relative)
    meta: dict[str, Any] = field(default_factory=dict)   # run metadata + tm_* fields

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        meta = d.pop("meta")
        d = {**meta, **d, "schema_version": SCHEMA_VERSION}
        return {k: _clean(v) for k, v in d.items()}


def _clean(value: Any) -> Any:
    """JSON has no NaN: store missing numbers as null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return _clean(value.item())
    return value


class ResultWriter:
    """Appends rows and fsyncs, so a crash never loses rows already written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Iterable[ResultRow]) -> int:
        lines = [json.dumps(r.to_json(), sort_keys=True) for r in rows]
        if not lines:
            return 0
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return len(lines)


def read_results(path: Path) -> pd.DataFrame:
    """All rows of a results.jsonl; a torn last line (crash mid-write) is ignored."""
    path = Path(path)
    rows = []
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = None
    if len(df) and (df["schema_version"] > SCHEMA_VERSION).any():
        from suite.errors import SuiteError
        raise SuiteError(f"{path} was written by a newer suite (schema {df['schema_version'].max()})")
    return df


def write_json_atomic(path: Path, data: Any) -> None:
    """Write then rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)  # keys keep insertion (run) order
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp.parquet")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
