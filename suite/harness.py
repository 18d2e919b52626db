"""The measuring loop, run inside one backend worker process.

The harness, not the backend, owns every clock and the communication meter, so all
backends are measured the same way (LoadGen's rule). It writes the backend's
predictions and timings as one part in the run folder; the parent turns parts into
metric rows.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from suite.backend import Backend, BackendContext, BatchMeta
from suite.data.imageset import ImageSet
from suite.extra_rows import typed_extra_rows
from suite.meter import CommMeter
from suite.results import write_json_atomic, write_parquet_atomic
from suite.run_folder import RunFolder


@dataclass
class Job:
    """Everything a worker needs, as plain JSON (so it can run on another host)."""

    run_dir: str
    backend_id: str
    backend: str
    options: dict[str, Any]
    track: str
    dataset_path: str
    test_index: list[int]
    model_ref: dict[str, Any]
    seed: int = 0
    threads: int = 2
    quick: bool = False
    cache_dir: str | None = None

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class AuditOutcome:
    """The audit phase's result: its rows, or the one-line error that ended it."""

    status: str = "none"            # none (the backend audits nothing) | ok | failed
    error: str | None = None
    rows: list[dict] = field(default_factory=list)


@dataclass
class Timings:
    setup_s: float | None = None
    fit_s: float | None = None
    audit_s: float | None = None
    teardown_s: float | None = None
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


def part_paths(run_dir: Path, backend_id: str) -> tuple[Path, Path]:
    folder = RunFolder(Path(run_dir))
    folder.parts_dir.mkdir(parents=True, exist_ok=True)
    return folder.part_meta(backend_id), folder.part_predictions(backend_id)


def check_probabilities(p: Any, batch: int, n_labels: int, backend_id: str) -> np.ndarray:
    """Reject outputs of the wrong shape, NaN or outside [0, 1]: a backend bug, not a result."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (batch, n_labels):
        raise ValueError(f"{backend_id} returned shape {p.shape}, expected {(batch, n_labels)}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{backend_id} returned non-finite probabilities")
    if p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise ValueError(f"{backend_id} returned probabilities outside [0, 1]")
    return np.clip(p, 0.0, 1.0)


def measure(backend: Backend, ctx: BackendContext, test: ImageSet, train: ImageSet | None,
            progress: bool = True) -> tuple[np.ndarray, Timings, AuditOutcome]:
    """setup (+ prepare_fit) -> fit (training track) -> predict batch by batch -> audit ->
    teardown, timed."""
    from tqdm import tqdm

    t = Timings()
    audit = AuditOutcome()
    meter = ctx.meter
    try:
        meter.set_phase("setup")
        start = time.perf_counter()
        backend.setup(ctx)
        if backend.track == "training":
            backend.prepare_fit(train, ctx)   # one-off, not training: counted as setup
        t.setup_s = time.perf_counter() - start
        if backend.track == "training":
            meter.set_phase("fit")
            start = time.perf_counter()
            backend.fit(train, ctx)
            t.fit_s = time.perf_counter() - start
        meter.set_phase("online")
        bs = max(1, backend.batch_size())
        out = np.zeros((len(test), len(test.label_names)))
        bar = tqdm(total=len(test), desc=f"{ctx.workdir.name}", unit="img", disable=not progress,
                   leave=False, dynamic_ncols=True)
        report = ProgressFile(ctx, len(test))
        for start_i in range(0, len(test), bs):
            x = test.images[start_i:start_i + bs]
            meta = BatchMeta(image_ids=tuple(str(i) for i in test.image_ids[start_i:start_i + bs]),
                             sites=tuple(str(s) for s in test.sites[start_i:start_i + bs]))
            start = time.perf_counter()
            p = backend.predict_proba(x, meta)
            t.batch_seconds.append(time.perf_counter() - start)
            t.batch_sizes.append(len(x))
            out[start_i:start_i + len(x)] = check_probabilities(p, len(x), len(test.label_names),
                                                                ctx.workdir.name)
            bar.update(len(x))
            report.update(start_i + len(x), t.batch_seconds[-1], len(x))
        bar.close()
        save_released_model(backend, ctx)
        audit = run_audit(backend, ctx, train, test, t)
    finally:
        meter.set_phase("teardown")
        start = time.perf_counter()
        backend.teardown()
        t.teardown_s = time.perf_counter() - start
    return out, t, audit


class ProgressFile:
    """The predict loop's progress as one small JSON file, rewritten atomically after every
    batch, so the parent can show images done, rate and time left on its own terminal."""

    def __init__(self, ctx: BackendContext, total: int) -> None:
        self.path = ctx.progress_path        # None (tests, benchmarks): nothing is written
        self.total, self.started = total, time.perf_counter()
        self.update(0, None, 0)

    def update(self, done: int, batch_s: float | None, batch_n: int) -> None:
        elapsed = time.perf_counter() - self.started
        if self.path is None:
            return
        try:
            write_json_atomic(self.path, {
                "done": done, "total": self.total, "elapsed_s": round(elapsed, 3),
                "batch_rate_img_s": round(batch_n / batch_s, 4) if batch_s else None})
        except OSError:
            pass   # progress is for the person watching; never a reason to fail the job


def save_released_model(backend: Backend, ctx: BackendContext) -> None:
    """A training configuration's released model, kept for compositions that serve it."""
    if backend.track != "training" or ctx.released_model_path is None:
        return
    bundle = backend.released_model()
    if bundle is not None:
        from suite.models import save_checkpoint

        save_checkpoint(bundle, ctx.released_model_path, recipe={"released_by": ctx.workdir.name})


def run_audit(backend: Backend, ctx: BackendContext, train: ImageSet | None, test: ImageSet,
              t: Timings) -> AuditOutcome:
    """The audit phase: timed apart from fit and predict; a failure is recorded, not raised,
    so the predictions already measured are kept."""
    if type(backend).audit is Backend.audit:
        return AuditOutcome()
    ctx.meter.set_phase("audit")
    start = time.perf_counter()
    try:
        rows = list(backend.audit(ctx, train, test))
        outcome = AuditOutcome(status="ok", rows=rows)
    except Exception as exc:  # noqa: BLE001 - recorded as the audit's result
        outcome = AuditOutcome(status="failed", error=format_error(exc))
    t.audit_s = time.perf_counter() - start
    return outcome


def predictions_frame(job: Job, test: ImageSet, probs: np.ndarray) -> pd.DataFrame:
    """Long format: one row per image x label."""
    n, n_labels = probs.shape
    return pd.DataFrame({
        "backend_id": job.backend_id,
        "backend": job.backend,
        "dataset": test.name,
        "image_id": np.repeat(test.image_ids.astype(str), n_labels),
        "site": np.repeat(test.sites.astype(str), n_labels),
        "label": np.tile(np.array(test.label_names), n),
        "y_true": test.labels.reshape(-1).astype(float),
        "prob": probs.reshape(-1),
    })


def write_part(job: Job, status: str, error: str | None, test: ImageSet | None,
               probs: np.ndarray | None, timings: Timings | None, meter: CommMeter | None,
               backend: Backend | None, log: str | None = None,
               audit: AuditOutcome | None = None) -> None:
    meta_path, pred_path = part_paths(Path(job.run_dir), job.backend_id)
    if probs is not None and test is not None:
        write_parquet_atomic(predictions_frame(job, test, probs), pred_path)
    traffic = []
    if meter is not None:
        for (phase, party), tr in meter.snapshot().items():
            traffic.append({"phase": phase, "party": party, **asdict(tr)})
    meta = {
        "backend_id": job.backend_id, "backend": job.backend, "status": status, "error": error,
        "timings": asdict(timings) if timings else None, "traffic": traffic,
        "versions": _safe(lambda: backend.versions(), {}) if backend else {},
        "extra_rows": (_typed(backend, backend.extra_rows(), RunFolder(Path(job.run_dir)))
                       if backend and status == "ok" else []),
        "audit": (asdict(_typed_audit(backend, audit, RunFolder(Path(job.run_dir)))) if audit
                  else asdict(AuditOutcome())),
        "n_images": len(test) if test is not None else None,
        "batch_size": backend.batch_size() if backend else None,
        "fit_scope": _safe(lambda: backend.fit_scope(), "") if backend else "",
        "traceback": log,
    }
    write_json_atomic(meta_path, meta)


def _typed(backend: Backend, rows: list[dict], folder: RunFolder | None = None) -> list[dict]:
    rows = typed_extra_rows(backend.config_label(), rows, getattr(backend, "extra_metrics", None))
    for row in rows:          # an artifact is named relative to the run folder, so it moves with it
        if row.get("artifact") and folder is not None and Path(row["artifact"]).is_absolute():
            row["artifact"] = folder.relative(Path(row["artifact"]))
    return rows


def _typed_audit(backend: Backend | None, audit: AuditOutcome, folder: RunFolder) -> AuditOutcome:
    if backend is None or audit.status != "ok":
        return audit
    try:
        return AuditOutcome(status="ok", rows=_typed(backend, audit.rows, folder))
    except ValueError as exc:
        return AuditOutcome(status="failed", error=format_error(exc))


def _safe(fn, default):
    """For descriptive metadata only (library versions): never for a measured figure."""
    try:
        return fn()
    except Exception:
        return default


def format_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def full_traceback() -> str:
    return traceback.format_exc()
