"""Shards of one backend configuration: how its test images are split, when a shard part
counts as done, and how shard parts merge into the one part a local run would have written.

A shard part is complete or absent: its predictions (`<k>.parquet`) are written first and
its record (`<k>.json`) last, atomically, and the record names the images it covers; a
shard whose record is missing, failed or disagrees with its predictions runs again on
`--resume`, and the merge takes each image from exactly one shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from suite.extra_rows import QUALIFIERS as EXTRA_QUALIFIERS
from suite.results import write_json_atomic
from suite.run_folder import RunFolder

SHARDED_TRACKS = ("reference", "inference")   # training runs whole, on one node


def split_images(test_index: list[int], order_rank: dict[int, int], n_shards: int) -> list[list[int]]:
    """`n_shards` disjoint parts of `test_index`, dealt round-robin in the run's stratified
    order so every shard sees the sites and findings in the same mix; empty shards dropped."""
    ranked = sorted(test_index, key=lambda i: order_rank.get(i, i))
    parts = [sorted(ranked[k::n_shards]) for k in range(max(1, n_shards))]
    return [p for p in parts if p]


def shard_count(track: str, n_images: int, slots: int, wanted: int | None) -> int:
    if track not in SHARDED_TRACKS or n_images <= 1:
        return 1
    return max(1, min(n_images, wanted or slots))


def complete_shard(folder: RunFolder, backend_id: str, shard: int, test_index: list[int]) -> dict | None:
    """The shard's record when its part is whole and covers exactly `test_index`; else None."""
    try:
        meta = json.loads(folder.shard_meta(backend_id, shard).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("status") != "ok" or meta.get("test_index") != list(test_index):
        return None
    try:
        n = len(pd.read_parquet(folder.shard_predictions(backend_id, shard), columns=["image_id"]))
    except (OSError, ValueError, ImportError):
        return None
    return meta if n == meta.get("n_prediction_rows") else None


def write_shard(folder: RunFolder, backend_id: str, shard: int, record: dict[str, Any],
                predictions: bytes | None) -> None:
    """Predictions first, the record last: a crash in between leaves a shard that re-runs."""
    folder.shards_dir(backend_id).mkdir(parents=True, exist_ok=True)
    folder.shard_meta(backend_id, shard).unlink(missing_ok=True)
    if predictions is not None:
        write_bytes_atomic(folder.shard_predictions(backend_id, shard), predictions)
        record["n_prediction_rows"] = len(pd.read_parquet(folder.shard_predictions(backend_id, shard),
                                                          columns=["image_id"]))
    write_json_atomic(folder.shard_meta(backend_id, shard), record)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def merge_predictions(folder: RunFolder, backend_id: str, n_shards: int) -> pd.DataFrame:
    frames = [pd.read_parquet(folder.shard_predictions(backend_id, k)) for k in range(n_shards)]
    merged = pd.concat(frames, ignore_index=True)
    twice = merged.duplicated(["image_id", "label"])
    if twice.any():
        raise ValueError(f"{backend_id}: {int(twice.sum())} predictions appear in two shards")
    return merged


def merge_parts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One part from its shards' parts: batches and traffic of all shards (each image once),
    peaks as the largest shard's, setup as the slowest shard's (they set up in parallel).

    Extra rows: a per-image figure is the image-weighted mean of the shards' (each is its
    shard's mean, so this is the mean over all images); a peak is the largest; any other
    figure is shard 0's and says so in its note."""
    first = records[0]
    timings: dict[str, Any] = {"batch_seconds": [], "batch_sizes": []}
    for key in ("setup_s", "fit_s", "audit_s", "teardown_s"):
        values = [(r.get("timings") or {}).get(key) for r in records]
        values = [v for v in values if v is not None]
        timings[key] = max(values) if values else None
    traffic: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        timings["batch_seconds"] += (r.get("timings") or {}).get("batch_seconds") or []
        timings["batch_sizes"] += (r.get("timings") or {}).get("batch_sizes") or []
        for t in r.get("traffic") or []:
            acc = traffic.setdefault((t["phase"], t["party"]), {})
            for k, v in t.items():
                if k not in ("phase", "party"):
                    acc[k] = acc.get(k, 0) + v
    return {
        "backend_id": first["backend_id"], "backend": first["backend"], "status": "ok", "error": None,
        "timings": timings,
        "traffic": [{"phase": ph, "party": pa, **v} for (ph, pa), v in traffic.items()],
        "versions": first.get("versions", {}),
        "extra_rows": merge_extra_rows([r.get("extra_rows") or [] for r in records],
                                       [r.get("n_images") or 0 for r in records]),
        "audit": first.get("audit") or {"status": "none", "error": None, "rows": []},
        "n_images": sum(r.get("n_images") or 0 for r in records),
        "batch_size": first.get("batch_size"), "traceback": None,
        "shards": [shard_summary(r) for r in records],
    }


QUALIFIERS = tuple(sorted(EXTRA_QUALIFIERS))


def merge_extra_rows(per_shard: list[list[dict]], sizes: list[int]) -> list[dict]:
    if len(per_shard) == 1:
        return per_shard[0]
    groups: dict[tuple, list[tuple[dict, int]]] = {}
    for rows, n in zip(per_shard, sizes):
        for row in rows:
            key = (row["metric"],) + tuple(str(row.get(q)) for q in QUALIFIERS)
            groups.setdefault(key, []).append((row, n))
    merged = []
    for (metric, *_), members in groups.items():
        row = dict(members[0][0])
        values = [(m["value"], n) for m, n in members if m.get("value") is not None]
        k = len(per_shard)
        if not values or len(members) != k:
            row["note"] = _note(row, f"shard 0's figure ({len(members)} of {k} shards reported it)")
        elif metric.endswith("_per_image"):
            total = sum(n for _, n in values)
            row["value"] = sum(v * n for v, n in values) / total if total else values[0][0]
            row["n"] = total
            row["note"] = _note(row, f"image-weighted mean over {k} shards")
        elif "peak" in metric:
            row["value"] = max(v for v, _ in values)
            row["note"] = _note(row, f"largest of {k} shards")
        else:
            row["note"] = _note(row, f"shard 0's figure (of {k} shards)")
        merged.append(row)
    return merged


def _note(row: dict, text: str) -> str:
    return f"{row['note']}; {text}" if row.get("note") else text


def shard_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What run.json keeps of a shard: who ran it, on which node, for how long."""
    return {k: record.get(k) for k in ("shard", "of", "n_images", "node", "started_at", "finished_at",
                                       "wall_s", "peak_rss", "status", "error")}
