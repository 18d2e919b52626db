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
from suite.run_folder import RunFolder

ALL = "__all__"        # site value of pooled rows
NONE = "__none__"      # label value of rows that belong to no label
MACRO = "__macro__"    # label value of macro averages over labels

RESULT_COLUMNS = [
    "schema_version", "run_id", "git_sha", "config_hash", "seed", "suite_version",
    "backend", "backend_id", "track", "reference", "dataset", "site", "label", "metric",
    "value", "ci_low", "ci_high", "ci_method", "n", "unit", "higher_is_better",
    "status", "error", "note", "party", "phase", "network", "estimate", "round", "view", "artifact",
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
    view: str | None = None          # what an audit's attacker observed (e.g. update, update+ldp)
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


REQUIRED_ROW_KEYS = ("backend_id", "metric", "status")
REQUIRED_RUN_KEYS = ("schema_version", "run_id", "config", "dataset", "backends")
_noted: set[tuple[str, int]] = set()


def read_result_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int | None]:
    """(line text, row) for every row of a results.jsonl, and the number of a torn last line.

    Only the last line may be torn (a crash while appending); a bad line anywhere else, or
    a line that is not a result row, is a SuiteError naming the file and the line."""
    from suite.errors import SuiteError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read {path}: {exc}") from None
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows, torn = [], None
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(numbered) - 1:
                torn = lineno
                break
            raise SuiteError(f"{path} line {lineno} is not valid JSON ({exc.msg}): the file is torn "
                             f"or was edited; only a torn last line can be skipped") from None
        if not isinstance(row, dict) or any(key not in row for key in REQUIRED_ROW_KEYS):
            missing = [key for key in REQUIRED_ROW_KEYS if not isinstance(row, dict) or key not in row]
            raise SuiteError(f"{path} line {lineno} is not a result row (lacks {', '.join(missing)})")
        rows.append((line, row))
    return rows, torn


def note_torn_line(path: Path, lineno: int) -> None:
    """Say once per process that a torn last line was skipped (the crash case)."""
    import sys

    if (str(path), lineno) not in _noted:
        _noted.add((str(path), lineno))
        print(f"note: skipped the torn last line {lineno} of {path} (a crash while writing)",
              file=sys.stderr)


def read_results(path: Path) -> pd.DataFrame:
    """All rows of a results.jsonl; a torn last line (crash mid-write) is skipped with a note,
    anything else torn or invalid is a SuiteError naming file and line."""
    path = Path(path)
    lines, torn = read_result_lines(path)
    if torn is not None:
        note_torn_line(path, torn)
    df = pd.DataFrame([row for _, row in lines])
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = None
    if len(df) and (pd.to_numeric(df["schema_version"], errors="coerce") > SCHEMA_VERSION).any():
        from suite.errors import SuiteError
        raise SuiteError(f"{path} was written by a newer suite (schema {df['schema_version'].max()})")
    return df


def rewrite_results(path: Path, keep: Iterable[str]) -> None:
    """Replace results.jsonl with the given lines (write then rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in keep))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_run_state(run_dir: Path) -> dict[str, Any]:
    """run.json of a run folder, checked: a torn or foreign file is a SuiteError naming it."""
    from suite.errors import SuiteError

    path = RunFolder(run_dir).run_json
    if not Path(run_dir).is_dir():
        raise SuiteError(f"{run_dir} is not a run folder (no such folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{run_dir} is not a run folder (no run.json)") from None
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg}): "
                         f"the file is torn or was edited") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path} is not a run description (not a JSON object)")
    missing = [k for k in REQUIRED_RUN_KEYS if k not in data]
    if missing:
        raise SuiteError(f"{path} is not a run description (lacks {', '.join(missing)})")
    if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
        raise SuiteError(f"{path} has schema {data['schema_version']!r}; this suite reads up to "
                         f"{SCHEMA_VERSION}")
    backends = data["backends"]
    if not isinstance(backends, dict) or not all(
            isinstance(b, dict) and isinstance(b.get("status"), str) for b in backends.values()):
        raise SuiteError(f"{path}: 'backends' must map each configuration to its status")
    return data


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
