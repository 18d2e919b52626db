"""Issue 14, item 3: nothing of a run outlives it. SIGTERM, SIGINT and SIGHUP to the parent
stop every worker and party; a worker whose parent died (even by SIGKILL, which no handler
sees) stops its children and itself. Checked with psutil on the real process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

# A parent that runs one watched "worker" the way the runner does; the worker watches its
# parent and starts a grandchild that watches nothing (the worst case: a library's helper).
PARENT = r"""
import sys
from suite.errors import Interrupted
from suite.procwatch import run_watched, stop_on_signals
WORKER = '''
import subprocess, sys, time
from suite.procwatch import watch_parent
watch_parent()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
time.sleep(600)
'''
try:
    with stop_on_signals():
        run_watched([sys.executable, "-c", WORKER], 600, log_path=None)
except Interrupted as exc:
    print("interrupted", exc.signame, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_all_gone(procs, within_s: float = 10.0):
    try:
        _wait_for(lambda: not _alive(procs), within_s, "the run's processes to exit")
    except AssertionError:
        left = _alive(procs)
        for p in left:
            p.kill()
        raise AssertionError(f"left behind: {[(p.pid, ' '.join(p.cmdline()[:4])) for p in left]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_signal_to_the_parent_leaves_no_process(sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        tree = _wait_for(lambda: len(_descendants(parent.pid)) >= 2 and _descendants(parent.pid),
                         60, "worker and grandchild")
        time.sleep(0.5)   # the worker's watch is set before it starts the grandchild
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=30)
        if sig != signal.SIGKILL:
            assert parent.returncode == 128 + sig, err
            assert f"interrupted {signal.Signals(sig).name}" in err
        _assert_all_gone(tree)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_positive_control_without_the_watch_the_grandchild_is_orphaned():
    """The same SIGKILL without watch_parent() in the worker: the tree outlives the parent, so
    the test above can see a leak."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.replace("watch_parent()", "pass")],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = _wait_for(lambda: len(_descendants(parent.pid)) >= 2 and _descendants(parent.pid),
                     60, "worker and grandchild")
    try:
        parent.kill()
        parent.wait(timeout=30)
        time.sleep(2)
        assert len(_alive(tree)) == 2
    finally:
        for p in _alive(tree):
            p.kill()


# ---------------------------------------------------------------- a real MPC run

def _mpc_parties(pid: int) -> list[psutil.Process]:
    parties = []
    for p in _descendants(pid):
        try:
            if "backends.mpc.crypten_party" in " ".join(p.cmdline()):
                parties.append(p)
        except psutil.Error:
            pass
    return parties


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_parent_during_an_mpc_run_leaves_no_process(tmp_path, sig):
    out = tmp_path / "run"
    cfg = tmp_path / "mpc.toml"
    cfg.write_text((REPO / "tests" / "tiny.toml").read_text()
                   .replace("n_train_per_site = 16", "n_train_per_site = 4")
                   .replace("n_test_per_site = 8", "n_test_per_site = 4"))
    parent = subprocess.Popen(
        [sys.executable, "-m", "suite", "run", "--config", str(cfg), "--out", str(out), "--no-report",
         "--model", "small-densenet-untrained", "--backends", "mpc:max_images=8:batch_size=1"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        parties = _wait_for(lambda: len(_mpc_parties(parent.pid)) >= 2, 540, "the MPC parties")
        tree = _descendants(parent.pid)
        assert len(tree) >= 3, tree          # worker + parties
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert parent.returncode == 128 + signal.SIGTERM, err[-2000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith("interrupted (SIGTERM)") and f"--resume {out}" in last, last
        _assert_all_gone(tree, within_s=15)
        assert not _alive(_mpc_parties(parent.pid)) and parties
    finally:
        if parent.poll() is None:
            parent.kill()
