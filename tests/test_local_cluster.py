"""A LocalRayCluster's nodes run in sessions of their own, so nothing reaches them when their
driver is killed: its SIGTERM / SIGINT handler stops them first. A driver that is SIGTERMed
leaves no process of its cluster behind; the positive control (the same driver with the
handler off, `stop_on_signals=False`) leaves its nodes running, so the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

from suite.executors.local_cluster import LocalRayCluster  # noqa: E402
from suite.procwatch import terminate_then_kill  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the driver: one node, its session id and temp folder on the first line, "up" when the
# cluster is up, then it waits to be killed
DRIVER = """
import json, sys, threading, time
from suite.executors.local_cluster import LocalRayCluster

cluster = LocalRayCluster(nodes=1, object_store_mb=80, stop_on_signals=sys.argv[1] == "on")

def report():
    while not cluster.procs:
        time.sleep(0.02)
    print(json.dumps({"session": cluster.procs[0].pid, "root": str(cluster.root)}), flush=True)

threading.Thread(target=report, daemon=True).start()
with cluster:
    print("up", flush=True)
    time.sleep(600)
"""


def _alive(session: int) -> list[psutil.Process]:
    out = []
    for q in LocalRayCluster._session(session):
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
        except psutil.Error:
            pass
    return out


def _start(handler: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, handler], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _up(driver: subprocess.Popen) -> dict:
    first = json.loads(driver.stdout.readline() or "null")
    assert first is not None, driver.stderr.read()[-3000:]
    assert driver.stdout.readline().strip() == "up", driver.stderr.read()[-3000:]
    return first


@pytest.mark.timeout(400)
def test_sigterm_to_the_driver_stops_its_nodes_and_without_the_handler_they_leak():
    """Both drivers at once (their start-ups overlap): SIGTERM each once its cluster is up."""
    drivers = {"on": _start("on"), "off": _start("off")}
    found: dict[str, dict] = {}
    try:
        for handler, driver in drivers.items():
            found[handler] = _up(driver)
            assert _alive(found[handler]["session"]), f"{handler}: no node process to leak"
        for driver in drivers.values():
            driver.send_signal(signal.SIGTERM)
        for handler, driver in drivers.items():
            driver.communicate(timeout=120)
            # the default action still ends the driver: killed by SIGTERM, not an exit status
            assert driver.returncode == -signal.SIGTERM, (handler, driver.returncode)

        deadline = time.monotonic() + 10           # orphans reaped by init
        while _alive(found["on"]["session"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(found["on"]["session"])
        assert not left, f"the handler left Ray processes running: {[q.name() for q in left]}"
        assert not Path(found["on"]["root"]).exists()

        # positive control: one thing differs, no handler; the node outlives its driver
        leaked = [q.name() for q in _alive(found["off"]["session"])]
        assert any("gcs_server" in n or "raylet" in n for n in leaked), leaked
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        for info in found.values():
            terminate_then_kill(_alive(info["session"]))
            shutil.rmtree(info["root"], ignore_errors=True)
