"""The warm fork server (suite/forkserver.py): a forked worker is as isolated and as watched
as a fresh one. A crash or a hang costs only that child; the server starts no thread before it
forks; children do not share random state; SIGKILL to the runner leaves no process behind
(with a positive control that leaks when the child sets no watch). End to end through the
CLI, with memory measured the same way as a fresh interpreter's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from suite.forkserver import ForkServer
from suite.procwatch import PARENT_ENV, run_forked
from tests.conftest import REPO, run_cli
from tests.test_reliability_procs import _alive, _assert_all_gone, _wait_for

TINY = str(REPO / "tests" / "tiny.toml")
ENTRIES = "tests.forkserver_entries"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def server():
    with ForkServer({**_env(), PARENT_ENV: str(os.getpid())}) as s:
        s.ready()
        yield s


def _run(server, tmp_path, entry: str, timeout_s: float = 60):
    job = tmp_path / f"{entry}.json"
    return run_forked(server, job, timeout_s, _env(), log_path=tmp_path / f"{entry}.log",
                      entry=f"{ENTRIES}:{entry}"), job


def test_the_server_forks_without_python_threads(server):
    """fork() copies one thread: a Python thread in the zygote would hand children locks held
    by none (native BLAS/allocator pools have fork handlers; a child starts with one thread,
    see test_children_are_fresh_workers)."""
    assert server.info["python_threads"] == 1, server.info
    maps = {m.path for m in psutil.Process(server.proc.pid).memory_maps()}
    assert any("libtorch_cpu" in path for path in maps)      # it did preload torch
    assert server.info["preload_cpu_s"] > 0


def test_a_child_segfaults_and_the_next_one_runs(server, tmp_path):
    crashed, _ = _run(server, tmp_path, "segfault")
    assert crashed.returncode == -signal.SIGSEGV and not crashed.timed_out
    assert server.alive()
    fine, _ = _run(server, tmp_path, "ok")
    assert fine.returncode == 0


def test_a_hanging_child_is_killed_at_its_limit(server, tmp_path):
    hung, _ = _run(server, tmp_path, "hang", timeout_s=2)
    assert hung.timed_out and hung.returncode is None
    assert server.alive()
    assert _run(server, tmp_path, "ok")[0].returncode == 0


def test_children_are_fresh_workers(server, tmp_path):
    """Own process group, no inherited thread, the run's OMP setting, torch threads set in the
    child, and a numpy draw of its own (two children drawing alike would share a stream)."""
    first, job_a = _run(server, tmp_path, "facts")
    a = json.loads(job_a.read_text())
    job_b = tmp_path / "b.json"
    run_forked(server, job_b, 60, _env(), entry=f"{ENTRIES}:facts")
    b = json.loads(job_b.read_text())
    assert first.returncode == 0
    assert a["pgid"] == a["pid"] and a["threads_at_start"] == 1 and a["omp"] == "2"
    assert a["torch_threads"] == 2
    assert a["draw"] != b["draw"]
    assert first.peak_rss > 100 * 2**20      # inherited imports are resident in the child: counted


# One runner forks two children from its zygote, alike but for the parent watch: the watched
# one is the test, the unwatched one its positive control (a control that differs in that one
# thing, on the same zygote and the same SIGKILL, at the cost of one runner instead of two).
PARENT = r"""
import os, sys
from suite.forkserver import ForkServer
from suite.procwatch import PARENT_ENV
env = dict(os.environ)
with ForkServer({**env, PARENT_ENV: str(os.getpid())}) as server:
    server.ready()
    print("zygote", server.proc.pid, flush=True)
    children = [server.start(job, env, None, entry=entry)
                for job, entry in zip(sys.argv[1::2], sys.argv[2::2])]
    children[0].wait()
"""


@pytest.fixture(scope="module")
def killed_runner(tmp_path_factory):
    """SIGKILL to a runner with a watched and an unwatched forked child, each with a
    grandchild: (zygote, watched [child, grandchild], unwatched [child, grandchild])."""
    tmp = tmp_path_factory.mktemp("sigkill")
    jobs = {entry: tmp / f"{entry}.json" for entry in ("watched_sleep", "unwatched_sleep")}
    argv = [str(a) for job_entry in ((jobs[e], f"{ENTRIES}:{e}") for e in jobs) for a in job_entry]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *argv], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    trees = []
    try:
        zygote = psutil.Process(int(parent.stdout.readline().split()[1]))
        for entry, job in jobs.items():
            facts = _wait_for(lambda: job.exists() and job.read_text() and json.loads(job.read_text()),
                              120, f"the {entry} child and its grandchild")
            trees.append([psutil.Process(facts["pid"]), psutil.Process(facts["grandchild"])])
        time.sleep(0.5)
        parent.kill()
        parent.wait(timeout=30)
        yield zygote, trees[0], trees[1]
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in _alive([q for tree in trees for q in tree]):
            p.kill()


def test_sigkill_to_the_runner_leaves_no_process(killed_runner):
    zygote, watched, _ = killed_runner
    _assert_all_gone([zygote, *watched])


def test_positive_control_an_unwatched_child_outlives_the_runner(killed_runner):
    zygote, _, unwatched = killed_runner
    _assert_all_gone([zygote])            # the zygote still goes (its pipe closed)...
    time.sleep(2)
    assert len(_alive(unwatched)) == 2    # ...but without the watch its child leaks


def _peak_rss(out, backend_id: str) -> float:
    from suite.results import read_results

    df = read_results(out / "results.jsonl")
    return float(df[(df.backend_id == backend_id) & (df.metric == "peak_rss")].value.iloc[0])


def test_forked_and_fresh_workers_measure_memory_alike(tmp_path):
    """The same null configuration, forked and in a fresh interpreter: both runs succeed, say
    how their workers started, and their peak RSS agree (RSS counts the pages a fork shares)."""
    runs = {}
    for mode, flag in (("fork-server", "1"), ("fresh-interpreter", "0")):
        out = tmp_path / mode
        proc = run_cli("run", "--config", TINY, "--backends", "null", "--model", "small-densenet-untrained",
                       "--out", str(out), "--no-report", env={"SUITE_FORK_SERVER": flag})
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = json.loads((out / "run.json").read_text())
        assert state["worker_start"]["mode"] == mode
        assert state["backends"]["null"]["worker_cpu_s"] > 0
        runs[mode] = _peak_rss(out, "null")
    ratio = runs["fork-server"] / runs["fresh-interpreter"]
    assert 0.7 < ratio < 1.4, runs
