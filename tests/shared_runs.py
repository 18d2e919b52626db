"""Backend runs on the tiny set through the harness loop, and the runs two test files share.

tests/test_conformance.py's battery and tests/test_fl.py's engine tests ran the same FL
configurations (the simulation and the deployment engine, 2 rounds on the 7 tiny sites) each
on their own. One run now serves both files' assertions: `shared_run` (tests/conftest.py)
measures a configuration once per worker, and tests/file_scheduling.py puts the conformance
tests of these labels in test_fl.py's unit, so both ask the same worker.

Likewise tests/test_runner.py's tiny CLI run and tests/test_progress.py's slow backend: one
`python -m suite run` on tiny.toml with the slow test backend added (`tiny_cli_run`), and
test_progress.py's tests scheduled in test_runner.py's unit (SHARED_FILES).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

# configuration label -> the test file whose unit its conformance test joins
SHARED_LABELS = {
    "fl[resolution=32,rounds=2]": "test_fl.py",
    "fl[engine=deployment,resolution=32,rounds=2]": "test_fl.py",
}
# test file -> the test file whose unit all its tests join (they assert on its run)
SHARED_FILES = {"test_progress.py": "test_runner.py"}

# the tiny CLI run: tiny.toml's backends plus tests/test_progress.py's slow one (a few tenths
# of a second per batch, so the parent prints its progress line)
SLOW_BACKEND = {"SUITE_EXTRA_BACKENDS": "slow=tests.test_progress:SlowBackend"}
TINY_CLI_BACKENDS = "plaintext,null,slow"


@dataclass
class TinyRun:
    backend: object          # the Backend that ran (its extra rows, its state after teardown)
    ctx: object              # the BackendContext (meter, workdir)
    test: object             # the test images it scored
    probs: np.ndarray
    timings: object
    audit: object
    leftover: set[int]       # child processes that outlived the run (must be none)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def run_tiny(backend, data, model, workdir: Path, threads: int) -> TinyRun:
    """`backend` through `measure` on the test split (its max_images), quick mode, seed 0."""
    from suite.backend import BackendContext
    from suite.harness import measure
    from suite.meter import CommMeter

    ctx = BackendContext(model=model, meter=CommMeter(), workdir=workdir / "work",
                         seed=0, threads=threads, quick=True)
    ctx.workdir.mkdir(parents=True)
    test = data.split("test")
    n = backend.max_images() or len(test)
    test = test.subset(np.arange(min(n, len(test))))
    train = data.split("train") if backend.track == "training" else None
    before = children()
    probs, timings, audit = measure(backend, ctx, test, train, progress=False)
    return TinyRun(backend, ctx, test, probs, timings, audit, children() - before)
