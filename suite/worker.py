"""Entry point of one backend job: `python -m suite.worker JOB.json`, or `main([JOB.json])`
in a child forked by the run's warm fork server (suite/forkserver.py), which has imported
torch and the harness once for every worker.

Each backend configuration runs in its own process so the parent can enforce a hard
time limit, measure the process tree's memory, and survive a backend that crashes. The
worker watches its parent (the runner, or the fork server that dies with the runner) from
the first line on: if the parent dies (even by SIGKILL), the worker stops every process it
started and exits, so nothing of a run is left behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run_job(job) -> int:
    import torch

    from suite.backend import BackendContext
    from suite.data.catalog import load_npz
    from suite.harness import format_error, full_traceback, measure, write_part
    from suite.meter import CommMeter
    from suite.model_source import load_model_ref
    from suite.registry_backends import BACKENDS
    from suite.run_folder import RunFolder

    torch.set_num_threads(max(1, job.threads))
    test = backend = meter = None
    try:
        data = load_npz(Path(job.dataset_path))
        test = data.subset(job.test_index)
        train = data.split("train") if job.track == "training" else None
        bundle = load_model_ref(job.model_ref).restricted(data.label_names)
        cls = BACKENDS.load(job.backend)
        backend = cls.create(cls.Options.parse(job.options, job.backend))
        meter = CommMeter()
        workdir = RunFolder(Path(job.run_dir)).workdir(job.backend_id)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = BackendContext(model=bundle, meter=meter, workdir=workdir, seed=job.seed,
                             threads=job.threads, quick=job.quick,
                             cache_dir=Path(job.cache_dir) if job.cache_dir else None,
                             released_model_path=RunFolder(Path(job.run_dir)).released_model(job.backend_id),
                             progress_path=RunFolder(Path(job.run_dir)).progress(job.backend_id))
        probs, timings, audit = measure(backend, ctx, test, train, progress=sys.stderr.isatty())
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a recorded result
        write_part(job, "failed", format_error(exc), None, None, None, meter, backend,
                   log=full_traceback())
        return 1
    try:
        write_part(job, "ok", None, test, probs, timings, meter, backend, audit=audit)
    except BaseException as exc:  # noqa: BLE001 - extra rows failed: keep the predictions
        write_part(job, "failed", f"extra rows: {format_error(exc)}", test, probs, timings, meter,
                   None, log=full_traceback(), audit=audit)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m suite.worker JOB.json", file=sys.stderr)
        return 2
    from suite.procwatch import PARENT_ENV, watch_parent

    watch_parent(int(os.environ.get(PARENT_ENV) or 0) or None)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from suite.harness import Job

    return run_job(Job.load(Path(argv[0])))


if __name__ == "__main__":
    raise SystemExit(main())
