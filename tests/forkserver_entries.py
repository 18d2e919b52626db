"""What forked children run in tests/test_forkserver.py (`entry="module:function"`, called with
[job path]), and a backend that segfaults, registered through SUITE_EXTRA_BACKENDS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.faulty_backends import _Base


def _report(path: str, **facts) -> None:
    Path(path).write_text(json.dumps(facts))


def ok(argv: list[str]) -> int:
    return 0


def segfault(argv: list[str]) -> int:
    import ctypes

    ctypes.string_at(0)          # SIGSEGV, no Python exception
    return 0


def hang(argv: list[str]) -> int:
    time.sleep(3600)
    return 0


def facts(argv: list[str]) -> int:
    """What the child starts with: threads, a numpy draw, torch's thread count once set."""
    import numpy as np
    import torch

    threads_at_start = len(os.listdir("/proc/self/task"))
    draw = float(np.random.random())
    torch.set_num_threads(2)
    _report(argv[0], threads_at_start=threads_at_start, draw=draw, torch_threads=torch.get_num_threads(),
            pid=os.getpid(), pgid=os.getpgid(0), omp=os.environ.get("OMP_NUM_THREADS"))
    return 0


def _grandchild_then_sleep(argv: list[str], watched: bool) -> int:
    if watched:                  # what suite.worker.main does first
        from suite.procwatch import PARENT_ENV, watch_parent

        watch_parent(int(os.environ.get(PARENT_ENV) or 0) or None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _report(argv[0], pid=os.getpid(), grandchild=child.pid)
    time.sleep(600)
    return 0


def watched_sleep(argv: list[str]) -> int:
    return _grandchild_then_sleep(argv, watched=True)


def unwatched_sleep(argv: list[str]) -> int:
    """Positive control: a child that never sets the parent watch outlives the run."""
    return _grandchild_then_sleep(argv, watched=False)


class SegfaultBackend(_Base):
    name = "segfault"

    def predict_proba(self, images, meta=None):
        segfault([])


EXTRA = "segfault=tests.forkserver_entries:SegfaultBackend"
