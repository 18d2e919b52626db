"""An MPC party as a child process of the benchmark worker: start, talk, watch, measure.

Shared by both MPC engines (CrypTen's `backends.mpc.crypten_party`, SPU's `backends.mpc.spu_party`).
Standard library only: the SPU parties import it from `.venv-spu/`, which has no torch and a
different numpy major, so everything that crosses the pipe is plain pickle of builtins (and,
for CrypTen, torch tensors, which both of its sides can read).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]          # the repository root (backends/mpc/ is two down)


def send(conn: Any, obj: Any) -> None:
    """Plain pickle over the orchestrator's socketpair (multiprocessing's own pickler would
    hand torch tensors over as shared memory, which needs a multiprocessing-spawned peer)."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def start_party(python: str, module: str, rank: int, env: dict[str, str], settings: dict[str, Any]):
    """Run `python -m module RANK FD` from the repo root, FD being its end of a socketpair;
    send it `settings` as the first message. Returns (process, our connection)."""
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    fd = theirs.detach()
    try:
        proc = subprocess.Popen([python, "-m", module, str(rank), str(fd)], pass_fds=(fd,), env=env,
                                cwd=str(ROOT), stdin=subprocess.DEVNULL)
    finally:
        os.close(fd)
    conn = Connection(ours.detach())
    send(conn, settings)
    return proc, conn


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def watch_parent(parent_pid: int) -> None:
    """Exit if the orchestrator disappears, even while blocked inside a collective."""
    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()
