"""Run a worker process under a hard time limit while sampling its memory, and make sure
nothing of a run outlives it.

Memory is the resident set of the whole process tree (parties, enclaves, clients the
backend starts), sampled by the parent so every backend is measured the same way.

Nothing left behind: SIGINT, SIGTERM and SIGHUP to the parent raise `Interrupted`, which
stops the running worker's whole tree on the way up; a worker watches its parent (Linux
PR_SET_PDEATHSIG plus a polling thread) and stops its own children and itself when the
parent is gone, even after a SIGKILL no handler can see.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from suite.errors import Interrupted

PARENT_ENV = "SUITE_PARENT_PID"    # the worker's parent, for its parent-death watch
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


@dataclass
class ProcResult:
    returncode: int | None
    timed_out: bool
    wall_s: float
    peak_rss: int                # bytes, whole tree, max over samples
    peak_rss_max_process: int    # bytes, largest single process
    cpu_s: float | None = None   # user + system CPU of the worker and the children it waited for
    lost: bool = False           # forked: the fork server vanished while the worker ran
    start_mode: str = "fresh-interpreter"   # or "fork-server" (suite/forkserver.py)


class TreeMemorySampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_total = 0
        self.peak_single = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


def terminate_then_kill(procs: list[psutil.Process], grace_s: float = 3.0) -> None:
    """SIGTERM each process, wait up to `grace_s`, SIGKILL the ones still alive."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_tree(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM the process group and every descendant, then SIGKILL what is left."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        procs = []
    procs = [p for p in procs if _running(p)]   # a zombie (ended, not yet reaped) needs no stop
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    terminate_then_kill(procs, grace_s)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_watched(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
                log_path: Path | None = None, on_poll=None, poll_s: float = 1.0) -> ProcResult:
    """`cmd` as a fresh process under the watch; `on_poll()` is called about every `poll_s`
    while the worker runs (progress display)."""
    import resource

    env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        result = watch(lambda: subprocess.Popen(cmd, env=env, stdout=log, stderr=None,
                                                start_new_session=True),
                       timeout_s, on_poll, poll_s)
    finally:
        if log_path:
            log.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.cpu_s = round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 3)
    return result


def run_forked(server, job_path: Path, timeout_s: float, env: dict[str, str],
               log_path: Path | None = None, on_poll=None, poll_s: float = 1.0,
               entry: str | None = None) -> ProcResult:
    """A worker forked by the run's warm fork server (`suite.forkserver`), under the same
    watch as `run_watched`: the clock starts at the request (after the server's one-off
    preload), memory is the child's tree, the limit kills the child's tree."""
    server.ready()
    extra = {"entry": entry} if entry else {}
    result = watch(lambda: server.start(job_path, env, log_path, **extra), timeout_s, on_poll, poll_s)
    result.start_mode = "fork-server"
    return result


def watch(start, timeout_s: float, on_poll=None, poll_s: float = 1.0) -> ProcResult:
    """Start a worker with `start()` (a Popen, or anything with its pid/wait/returncode) and
    watch it: hard time limit, whole-tree memory samples, the tree stopped on every way out."""
    begin = time.perf_counter()
    proc = start()
    try:
        sampler = TreeMemorySampler(proc.pid)
        sampler.start()
        timed_out = False
        timed_out = not wait_polling(proc, begin + timeout_s, on_poll, poll_s)
        sampler.stop()
    finally:
        # on every way out (time limit, exception, Interrupted): the worker, its parties
        # and anything else the backend left running
        with _signals_deferred():
            kill_tree(proc.pid)
            proc.wait()
            if hasattr(proc, "release"):      # forked: only now may its pid be reused
                proc.release()
    return ProcResult(
        returncode=None if timed_out else proc.returncode, timed_out=timed_out,
        wall_s=time.perf_counter() - begin, peak_rss=sampler.peak_total,
        peak_rss_max_process=sampler.peak_single, cpu_s=getattr(proc, "cpu_s", None),
        lost=bool(getattr(proc, "lost", False)),
    )


def wait_polling(proc, deadline: float, on_poll, poll_s: float) -> bool:
    """Wait for `proc` until `deadline` (perf_counter), calling `on_poll` in between;
    False when the deadline passed first."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return False
        try:
            proc.wait(timeout=min(left, poll_s) if on_poll else left)
            return True
        except subprocess.TimeoutExpired:
            if on_poll:
                on_poll()


# ---------------------------------------------------------------- the parent's signals

_interrupted = threading.Event()


def _raise_interrupted(signum, _frame) -> None:
    if _interrupted.is_set():
        return   # already stopping: a second Ctrl-C must not cut the clean-up short
    _interrupted.set()
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread (what `timeout`,
    systemd, Slurm and a closed terminal send), so the run stops its workers on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous = {name: signal.signal(getattr(signal, name), _raise_interrupted)
                for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


@contextlib.contextmanager
def _signals_deferred():
    """Hold stop signals while a worker tree is being stopped; re-deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {getattr(signal, n) for n in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# ---------------------------------------------------------------- the worker's watch

def stop_children_and_exit(code: int) -> None:
    """Stop every descendant of this process (parties, enclaves, clients), then exit at once."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    terminate_then_kill(children, grace_s=2.0)
    os._exit(code)


def watch_parent(parent_pid: int | None = None, interval_s: float = 0.2) -> None:
    """Exit with all children when the parent dies: the kernel sends SIGTERM at once
    (PR_SET_PDEATHSIG, Linux), and a thread polls getppid() as a fallback for the rare case
    the main thread is stuck in native code or prctl is unavailable."""
    parent_pid = parent_pid or os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: stop_children_and_exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGHUP, lambda *_: stop_children_and_exit(128 + signal.SIGHUP))
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:   # the parent died before the watch was set
        stop_children_and_exit(1)

    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                stop_children_and_exit(1)
            time.sleep(interval_s)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()
