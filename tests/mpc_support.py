"""What the MPC engines' tests share: killing a party mid-run, and stopping a party program."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def kill_party_mid_run(backend, ctx, images, victim: int) -> tuple[BaseException, float]:
    """SIGKILL party `victim` while the backend keeps predicting; returns what the backend
    raised and how many seconds after the kill. Fails if the backend hangs or teardown leaves
    party processes behind."""
    before = children()
    outcome: dict = {}
    try:
        backend.setup(ctx)

        def run():
            try:
                while True:                 # keep the parties busy until one is killed
                    backend.predict_proba(images)
            except BaseException as exc:  # noqa: BLE001
                outcome["exc"] = exc
                outcome["at"] = time.monotonic()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(backend._procs[victim].pid, signal.SIGKILL)
        worker.join(timeout=45)
        assert not worker.is_alive(), "the backend hung after a party was killed"
    finally:
        backend.teardown()
    time.sleep(0.5)
    assert not (children() - before), "teardown left party processes behind"
    return outcome["exc"], outcome["at"] - killed_at


def stop(proc, timeout: float = 30) -> None:
    """Wait for a party program to end by itself; kill it if it does not."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
