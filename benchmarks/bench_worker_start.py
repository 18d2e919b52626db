"""The per-worker floor: one `null` job (a few images, nothing computed) in a fresh
interpreter (`python -m suite.worker`) against the same job forked from a warm fork server
(suite/forkserver.py): the CPU seconds the worker itself spent (user + system)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks._fixtures import synthetic


def null_job(folder: Path) -> Path:
    """A real worker job, as the runner writes it: null backend, 32 px synthetic images."""
    import numpy as np

    from suite.data.catalog import save_npz
    from suite.harness import Job

    data = synthetic(n_per_site=2, size=32)
    save_npz(data, folder / "data.npz")
    job = Job(run_dir=str(folder / "run"), backend_id="null", backend="null", options={}, track="inference",
              dataset_path=str(folder / "data.npz"),
              test_index=[int(i) for i in np.flatnonzero(data.splits == "test")],
              model_ref={"kind": "random", "architecture": "small", "pathologies": list(data.label_names),
                         "resolution": 32, "seed": 0}, threads=2)
    (folder / "run").mkdir()
    path = folder / "null.job.json"
    job.save(path)
    return path


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


class WorkerStart:
    timeout = 300
    repeat = 3
    number = 1

    def setup(self):
        from suite.forkserver import ForkServer
        from suite.procwatch import PARENT_ENV

        self.folder = Path(tempfile.mkdtemp(prefix="bench-worker-"))
        self.job = null_job(self.folder)
        self.server = ForkServer({**worker_env(), PARENT_ENV: str(os.getpid())})
        self.server.ready()

    def teardown(self):
        self.server.close()

    def _fresh(self):
        import sys

        from suite.procwatch import run_watched

        return run_watched([sys.executable, "-m", "suite.worker", str(self.job)], 300, worker_env())

    def _forked(self):
        from suite.procwatch import run_forked

        return run_forked(self.server, self.job, 300, worker_env())

    # CPU seconds rather than wall: the figure that holds on a shared, loaded machine
    def track_cpu_fresh_interpreter(self):
        result = self._fresh()
        assert result.returncode == 0
        return result.cpu_s

    def track_cpu_forked(self):
        result = self._forked()
        assert result.returncode == 0
        return result.cpu_s

    track_cpu_fresh_interpreter.unit = "seconds"
    track_cpu_forked.unit = "seconds"
