"""Run a worker process under a hard time limit while sampling its memory.

Memory is the resident set of the whole process tree (parties, enclaves, clients the
backend starts), sampled by the parent so every backend is measured the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class ProcResult:
    returncode: int | None
    timed_out: bool
    wall_s: float
    peak_rss: int                # bytes, whole tree, max over samples
    peak_rss_max_process: int    # bytes, largest single process


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


def kill_tree(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM the process group and every descendant, then SIGKILL what is left."""
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        procs = []
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
                log_path: Path | None = None) -> ProcResult:
    start = time.perf_counter()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=None, start_new_session=True)
        sampler = TreeMemorySampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:
            kill_tree(proc.pid)
            raise
        sampler.stop()
        kill_tree(proc.pid)  # also reaps anything the backend left running
        proc.wait()
    finally:
        if log_path:
            log.close()
    return ProcResult(
        returncode=None if timed_out else proc.returncode, timed_out=timed_out,
        wall_s=time.perf_counter() - start, peak_rss=sampler.peak_total,
        peak_rss_max_process=sampler.peak_single,
    )
