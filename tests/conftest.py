"""Shared fixtures: a tiny synthetic dataset and a tiny model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Before torch loads OpenMP (see suite/runner.py for why PASSIVE).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
NIH_SAMPLE = REPO.parent / "shared" / "data" / "nih-cxr14-sample"


# Parallel runs (`pytest -n 2 --dist loadgroup`, as scripts/test.sh does): a file's tests stay
# on one worker (tests/file_scheduling.py), so its module-scoped fixtures (one tiny run folder,
# one trained model, one started enclave) are built once. Files whose tests share nothing
# costly are spread test by test instead: their runs are the longest single files.
SPREAD_FILES = ("test_conformance.py", "test_benchmarks_run.py")
# Started first, longest indivisible files before the spread ones, so the longest work does not
# begin last on one worker while the other idles (scripts/test.sh passes --no-loadscope-reorder,
# which keeps this order). test_fl.py's unit holds the conformance runs it shares, and
# test_runner.py's holds test_progress.py (tests/shared_runs.py). `python -m tests.timeline`
# replays a recorded run in this order (TEST_TIMELINE), so a new order can be judged offline.
LONG_FILES = ("test_real_data.py", "test_ray_executor.py", "test_mpc_namespaces.py", "test_runner.py",
              "test_resume.py", "test_forkserver.py",
              "test_fl.py", "test_conformance.py", "test_benchmarks_run.py", "test_composition.py",
              "test_mpc.py", "test_mpc_spu.py", "test_validate.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)                      # stable: each file keeps its own order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: one unit per file (SPREAD_FILES: per test), in collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.file_scheduling import FileScheduling
    from tests.shared_runs import SHARED_FILES, SHARED_LABELS

    return FileScheduling(config, log, spread_files=SPREAD_FILES, joins=SHARED_LABELS,
                          file_joins=SHARED_FILES)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With TEST_TIMELINE=FILE, each test's worker, wall span and CPU go there (tests/timeline.py
    prints the plan as it ran)."""
    path = os.environ.get("TEST_TIMELINE")
    if not path:
        yield
        return
    import time

    from tests.timeline import cpu_seconds, record

    start, cpu = time.time(), cpu_seconds()
    yield
    record(path, os.environ.get("PYTEST_XDIST_WORKER", "main"), item.nodeid, start, cpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Tests never write into the user's caches or reports."""
    base = tmp_path_factory.mktemp("suite-home")
    for env, sub in (("SUITE_CACHE_DIR", "cache"), ("SUITE_DATA_CACHE", "data"),
                     ("SUITE_REPORTS_DIR", "reports")):
        os.environ[env] = str(base / sub)
    yield


@pytest.fixture(scope="session")
def tiny_data():
    """7 sites x (12 train + 6 test) phantoms at 32 px."""
    from suite.data.synthetic import generate_synthetic

    return generate_synthetic(n_train_per_site=12, n_test_per_site=6, size=32, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_data):
    """An untrained small DenseNet, seeded: enough to compare backends with plaintext."""
    from suite.models import random_small_densenet

    return random_small_densenet(tiny_data.label_names, resolution=32, seed=0)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tiny_data, tiny_model):
    """`shared_run(backend)`: its run on the tiny set (tests/shared_runs.py), measured once per
    worker and configuration however many files assert on it; on one thread, as test_fl's
    engine tests train (two spin-waiting OpenMP threads crawl on a loaded host)."""
    import torch

    from tests.shared_runs import run_tiny

    runs = {}

    def get(backend):
        label = backend.config_label()
        if label not in runs:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runs[label] = run_tiny(backend, tiny_data, tiny_model,
                                       tmp_path_factory.mktemp("shared-run"), threads=1)
            finally:
                torch.set_num_threads(before)
        return runs[label]

    return get


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory):
    """`python -m suite run` on tiny.toml (the trained default model) with the slow test
    backend added: tests/test_runner.py's files, rows and resume and tests/test_progress.py's
    progress line assert on this one run (tests/shared_runs.py)."""
    from tests.shared_runs import SLOW_BACKEND, TINY_CLI_BACKENDS

    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("run", "--config", str(REPO / "tests" / "tiny.toml"), "--backends", TINY_CLI_BACKENDS,
                   "--out", str(out), env=SLOW_BACKEND)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def nih_sample_dir():
    if not NIH_SAMPLE.exists():
        pytest.skip(f"{NIH_SAMPLE} is absent")
    return NIH_SAMPLE


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """`python -m suite ...` in a subprocess, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "suite", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def run_main(*args: str):
    """`suite.cli.main(args)` in this process, its stdout and stderr captured: the same
    dispatcher and one-line error handling as `run_cli`, without paying a fresh interpreter's
    torch import (seconds each). For commands that start no worker (refusals, report,
    compare); a test per file still goes through `python -m suite`, the real entry point."""
    import contextlib
    import io
    import subprocess

    from suite.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


@pytest.fixture
def rng():
    return np.random.default_rng(0)
