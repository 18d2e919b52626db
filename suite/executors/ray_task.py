"""What runs on a Ray node for one shard: the same worker entry point as a local run
(`python -m suite.worker JOB.json`, watched by `run_watched`), in a node-local scratch run
folder, so the harness measures exactly as it does on one machine.

Nothing assumes a shared file system: the dataset and model arrive as bytes, the part
comes back as bytes, and the scratch folder is removed. Progress is pushed to the driver's
board actor while the worker runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

SCRATCH_FILES = ("dataset.npz", "model.pt")


def node_identity() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}


def run_shard(job: dict[str, Any], dataset: bytes, model: bytes | None, board, key: str,
              timeout_s: float, env_overrides: dict[str, str]) -> dict[str, Any]:
    """Run one shard's job; return its part (record, predictions, released files) as bytes."""
    import json

    from suite.harness import Job
    from suite.procwatch import run_watched
    from suite.run_folder import RunFolder

    started = time.time()
    node = node_identity()
    if env_overrides.get("SUITE_DRIVER_NICE"):     # run the measured job no less nicely than
        try:                                       # the driver was started (`nice -n 10 suite run`)
            os.nice(max(0, int(env_overrides["SUITE_DRIVER_NICE"]) - os.nice(0)))
        except OSError:
            pass
    scratch = Path(tempfile.mkdtemp(prefix="suite-shard-"))
    try:
        (scratch / "dataset.npz").write_bytes(dataset)
        if model is not None:
            (scratch / "model.pt").write_bytes(model)
            job["model_ref"] = {**job["model_ref"], "path": str(scratch / "model.pt")}
        folder = RunFolder(scratch / "run")
        folder.parts_dir.mkdir(parents=True)
        job.update(run_dir=str(folder.root), dataset_path=str(scratch / "dataset.npz"))
        if job.get("cache_dir") and not Path(job["cache_dir"]).is_dir():
            job["cache_dir"] = None
        backend_id = job["backend_id"]
        job_path = folder.job(backend_id)
        Job(**job).save(job_path)
        progress = folder.progress(backend_id)

        def push() -> None:
            try:
                p = json.loads(progress.read_text())
            except (OSError, ValueError):
                return
            try:
                board.update.remote(key, p["done"], p["total"])
            except Exception:  # noqa: BLE001 - progress only; the board may be restarting
                pass

        env = {**os.environ, **env_overrides}
        proc = run_watched([sys.executable, "-m", "suite.worker", str(job_path)], timeout_s, env,
                           log_path=job_path.with_suffix(".log"), on_poll=push)
        push()
        meta_path, pred_path = folder.part_meta(backend_id), folder.part_predictions(backend_id)
        files = {}
        artifacts = folder.artifacts(backend_id)
        for path in folder.root.rglob("*"):
            released = path == folder.released_model(backend_id)
            if path.is_file() and (released or path.is_relative_to(artifacts)):
                files[folder.relative(path)] = path.read_bytes()
        log = job_path.with_suffix(".log")
        return {
            "meta": json.loads(meta_path.read_text()) if meta_path.exists() else None,
            "predictions": pred_path.read_bytes() if pred_path.exists() else None,
            "files": files, "proc": asdict(proc), "node": node,
            "started_at": started, "finished_at": time.time(),
            "log_tail": log.read_text(errors="replace")[-4000:] if log.exists() else "",
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class ProgressBoard:
    """Images done per shard, reported by the tasks, read by the driver (a Ray actor)."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[int, int, float]] = {}

    def update(self, key: str, done: int, total: int) -> None:
        first = self.done.get(key, (0, 0, time.time()))[2]
        self.done[key] = (done, total, first)

    def snapshot(self) -> dict[str, tuple[int, int, float]]:
        return dict(self.done)
