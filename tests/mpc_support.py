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


# ------------------------------------------------------------------ MT19937 state recovery

def _untemper(y):
    """Invert MT19937's output tempering (numpy uint64 arrays holding 32-bit values)."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    y = y ^ (y >> np.uint64(18))
    y = y ^ ((y << np.uint64(15)) & np.uint64(0xEFC60000))
    x = y
    for _ in range(5):
        x = y ^ ((x << np.uint64(7)) & np.uint64(0x9D2C5680))
    y = x & m32
    x = y
    for _ in range(3):
        x = y ^ (x >> np.uint64(11))
    return x & m32


def words_to_outputs(words):
    """int64 ring elements drawn by torch.randint over the full ring -> the 32-bit MT19937
    outputs behind them (torch builds each from two outputs, the first in the high half)."""
    import numpy as np

    u = np.asarray(words, dtype=np.int64).view(np.uint64) + np.uint64(1 << 63)
    out = np.empty(2 * len(u), dtype=np.uint64)
    out[0::2], out[1::2] = u >> np.uint64(32), u & np.uint64(0xFFFFFFFF)
    return out


def clone_mt19937(outputs):
    """A numpy MT19937 whose next outputs are those following 624 observed 32-bit outputs."""
    import numpy as np

    outputs = np.asarray(outputs, dtype=np.uint64)
    if len(outputs) < 624:
        raise ValueError("MT19937 state recovery needs 624 consecutive 32-bit outputs")
    bg = np.random.MT19937(0)
    bg.state = {"bit_generator": "MT19937",
                "state": {"key": _untemper(outputs[:624]).astype(np.uint32), "pos": 624}}
    return bg


def outputs_to_words(outputs):
    """Consecutive 32-bit outputs (even count) -> the int64 ring elements torch makes of them."""
    import numpy as np

    o = np.asarray(outputs, dtype=np.uint64)
    u = (o[0::2] << np.uint64(32)) | o[1::2]
    u = np.where(u == np.uint64(2 ** 64 - 1), np.uint64(0), u)      # torch: r64 % (2^64 - 1)
    return (u - np.uint64(1 << 63)).view(np.int64)


def predict_after(observed_words, n_words: int):
    """Predict the n_words ring elements that follow 312 observed ones (MT19937 attack)."""
    bg = clone_mt19937(words_to_outputs(observed_words[:312]))
    return outputs_to_words(bg.random_raw(2 * n_words))


def kill_party_during_setup(backend, ctx, victim: int, delay: float) -> tuple[BaseException | None, float]:
    """SIGKILL party `victim` `delay` seconds after it started, while `backend.setup` runs;
    returns what setup raised (None if it finished first) and how many seconds after the kill.
    Fails if setup hangs or teardown leaves party processes behind."""
    before = children()
    outcome: dict = {}

    def run():
        try:
            backend.setup(ctx)
        except BaseException as exc:  # noqa: BLE001
            outcome["exc"] = exc
        outcome["at"] = time.monotonic()

    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while victim not in backend._procs and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.02)
        assert victim in backend._procs, "the party was never started"
        time.sleep(delay)
        killed_at = time.monotonic()
        try:
            os.kill(backend._procs[victim].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.join(timeout=60)
        assert not worker.is_alive(), "setup hung after a party was killed"
    finally:
        backend.teardown()
    time.sleep(0.5)
    assert not (children() - before), "teardown left party processes behind"
    return outcome.get("exc"), outcome["at"] - killed_at
