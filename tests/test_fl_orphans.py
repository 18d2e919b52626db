"""Nothing the FL engine starts outlives the process that started it.

A child Python process starts the deployment engine's processes (SuperLink, its SuperExec,
a SuperNode with its site-runner thread) the way the backend does, reports that they are up
(the runner thread has said it is ready), and is
SIGKILLed: no handler runs, so only the parent-death watch (PR_SET_PDEATHSIG, set in
`backends.fl.engine.popen_watched`) and Flower's own `--parent-pid` monitors can stop them.
The positive control starts the same engine with the watch disabled and finds its SuperLink
still running after the same kill (then stops it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.skipif(find_spec("flwr") is None, reason="fl backend needs the [fl] extra"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")]

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    import backends.fl.engine as engine
    from backends.fl.app import FLJob

    work, sites, watch = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "watch"
    if not watch:
        engine.die_with_parent = lambda: None      # the control: no parent-death watch
    job = FLJob(out_dir=str(work / "server"), data_dir=str(work / "sites"),
                sites=[f"site-{k + 1}" for k in range(max(sites, 1))], n_labels=5,
                architecture={}, threads=1)
    dep = engine.Deployment(work, job, work / "job.json", simulation=sites == 0)
    dep.start()
    print("ready", flush=True)
    sys.stdin.read()                                # until killed
""")


def _engine_processes(home: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _start_and_kill(tmp_path: Path, sites: int, watch: bool) -> tuple[list[str], list[psutil.Process]]:
    """(names of the engine's processes while up, those still alive 15 s after the kill)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(sites),
                              "watch" if watch else "off"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    home = tmp_path / "flwr-home"
    try:
        assert child.stdout.readline().strip() == "ready", "the engine did not start"
        up = [" ".join(p.cmdline()[:3]) for p in _engine_processes(home)]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _engine_processes(home) and time.monotonic() < deadline:
            time.sleep(0.3)
        return up, _engine_processes(home)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.timeout(240)
def test_killing_the_parent_leaves_no_engine_process(tmp_path):
    from backends.fl.engine import stop_by_home

    try:
        up, left = _start_and_kill(tmp_path, sites=1, watch=True)
        names = " ".join(up)
        assert "flower-superlink" in names and "flower-superexec" in names
        assert "backends.fl.supernode" in names
        assert "backends.fl.site_runner" not in names       # one process per site: a thread
        from backends.fl.site_runner import READY

        assert READY in (tmp_path / "logs" / "supernode-0.log").read_text()
        assert not left, f"left running: {[p.cmdline()[:3] for p in left]}"
    finally:
        stop_by_home(tmp_path / "flwr-home", grace=2)


@pytest.mark.timeout(120)
def test_control_without_the_watch_the_superlink_is_orphaned(tmp_path):
    """Positive control: the same kill without PR_SET_PDEATHSIG leaves the SuperLink."""
    from backends.fl.engine import stop_by_home

    try:
        up, left = _start_and_kill(tmp_path, sites=0, watch=False)
        assert any("flower-superlink" in n for n in up)
        assert any("flower-superlink" in " ".join(p.cmdline()) for p in left)
    finally:
        stop_by_home(tmp_path / "flwr-home", grace=2)
