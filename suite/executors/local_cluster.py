"""A Ray cluster of N nodes on this host's loopback, for the Ray executor's test and
benchmark: each node is its own `ray start --block` process tree, offering one measured
slot, optionally pinned to its own cores, and stopped by process id (never `ray stop`,
which would stop every Ray process of this user, other people's included).

    with LocalRayCluster(nodes=2, cores=[[0], [1]]) as cluster:
        run(..., executor=ExecutorSpec("ray", address=cluster.address))
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from suite.executors import DEFAULT_SLOT_RESOURCE
from suite.procwatch import terminate_then_kill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_process(cores: list[int] | None) -> None:
    """In the `ray start` child: its cores, and normal priority where allowed, because Ray
    gives a raylet a fixed 30 s to register and a niced one on a loaded host misses it. The
    measured jobs do not inherit this: each task lowers its priority to the driver's
    (suite.executors.ray_task)."""
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        os.nice(-os.nice(0))
    except OSError:
        pass


class LocalRayCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, cores: list[list[int]] | None = None,
                 object_store_mb: int = 100, slot_resource: str = DEFAULT_SLOT_RESOURCE,
                 start_timeout_s: float = 300.0) -> None:
        self.n_nodes, self.cpus, self.cores = nodes, cpus_per_node, cores
        self.object_store = object_store_mb * 2**20
        self.slot_resource, self.start_timeout_s = slot_resource, start_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))   # short: Ray's socket paths

    RESTARTS = 3   # `ray start` gives a raylet 30 s to register (fixed in Ray): a loaded host misses it

    def _start_node(self, i: int, head: bool) -> None:
        cmd = [sys.executable, "-m", "suite.executors.ray_node_launcher", "start", "--block", "--num-cpus", str(self.cpus), "--num-gpus", "0",
               "--resources", json.dumps({self.slot_resource: 1}),
               "--object-store-memory", str(self.object_store), "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / f"n{i}")]
        cmd += (["--head", "--port", str(self.port), "--include-dashboard=false"] if head
                else ["--address", self.address])
        cores = self.cores[i] if self.cores else None
        # Ray's memory monitor kills the newest worker when the *host* passes 95% memory; on a
        # shared machine that is other people's processes, so it is off for this test cluster
        # (the suite's own time limit and memory sampling still apply)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
        log = open(self.root / f"node{i}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: _node_process(cores))
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)

    def _wait(self, ready, what: str, nodes: range) -> None:
        """Until `ready()`; a node of `nodes` whose `ray start` died is started again."""
        deadline = time.monotonic() + self.start_timeout_s
        restarts = dict.fromkeys(nodes, 0)
        while not ready():
            for i in nodes:
                if self.procs[i].poll() is not None and restarts[i] < self.RESTARTS:
                    restarts[i] += 1
                    terminate_then_kill(self._session(self.procs[i].pid))   # what it left running
                    self._start_node(i, head=i == 0)
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join((self.root / f"node{i}.log").read_text(errors="replace")[-1500:]
                                  for i in range(len(self.procs)))
                raise RuntimeError(f"local Ray cluster: {what} did not come up\n{logs}")
            time.sleep(0.5)

    def _head_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def __enter__(self) -> "LocalRayCluster":
        try:
            self._start_node(0, head=True)
            self._wait(lambda: self._head_listening() and self._registered(1), "the head node",
                       range(0, 1))
            for i in range(1, self.n_nodes):
                self._start_node(i, head=False)
            self._wait(lambda: self._registered(self.n_nodes), f"{self.n_nodes} nodes",
                       range(1, self.n_nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def _registered(self, n_nodes: int) -> bool:
        """Ask the cluster (from a child process, so this one stays free of Ray state) whether
        `n_nodes` nodes have registered their slot, for up to 20 s."""
        script = ("import ray,sys,time; ray.init(address=sys.argv[1], log_to_driver=False, "
                  "configure_logging=False); end = time.monotonic() + 20\n"
                  "while sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get(sys.argv[2])) "
                  "< int(sys.argv[3]):\n"
                  "    if time.monotonic() > end: sys.exit(1)\n"
                  "    time.sleep(0.5)\n")
        try:
            out = subprocess.run([sys.executable, "-c", script, self.address, self.slot_resource,
                                  str(n_nodes)], capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _session(sid: int) -> list[psutil.Process]:
        """Every process of a node's session (`ray start` runs in its own), daemons included."""
        found = []
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) == sid:
                    found.append(q)
            except (OSError, psutil.Error):
                pass
        return found

    def stop(self) -> None:
        """Every process of every node (workers, raylets, GCS), by id; then the temp folder."""
        procs = []
        for p in self.procs:
            try:
                procs += [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                pass
        for p in self.procs:                                     # daemons that left the tree
            procs += [q for q in self._session(p.pid) if q not in procs]
        terminate_then_kill(procs, grace_s=5.0)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
