"""The two Flower engines the `fl` backend runs a federation on.

simulation  Flower's Simulation Engine (`flwr.simulation.run_simulation`): the ServerApp in a
            thread of this process, the ClientApps on Ray actors. Ray is started here (so its
            start-up can be reported) and always shut down.
deployment  Flower's Deployment Engine as separate processes on loopback: one SuperLink and one
            SuperNode per site (`--node-config "partition-id=k"`), the run submitted with
            `flwr run <app> <connection> --stream` against a Flower config in the run's work
            folder (FLWR_HOME), so the user's ~/.flwr is never touched; the job travels
            inline in the run config (`job='b64:...'`) and each SuperNode is pointed at its
            own data file (`data-path`). Every process started (and every descendant:
            SuperExec, ServerApp and ClientApp processes) is stopped.

Both return an `EngineReport` (start-up seconds, where the logs are).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends.fl.app import JOB_KEY, SUMMARY, FLJob
from suite.procwatch import terminate_then_kill

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
             "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def child_env(threads: int) -> dict[str, str]:
    """Environment for engine processes: quiet, offline, and the worker's thread settings.

    OMP_WAIT_POLICY is passed on when the worker has it, so sites compute under the same
    OpenMP regime as the centralised control (PASSIVE matters on an oversubscribed host).
    """
    env = {**QUIET_ENV, "OMP_NUM_THREADS": str(max(1, threads))}
    if os.environ.get("OMP_WAIT_POLICY"):
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    return env


@dataclass
class EngineReport:
    engine: str
    startup_s: float
    logs: list[str] = field(default_factory=list)


class EngineError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------------------

def run_simulation_engine(job: FLJob) -> EngineReport:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import logging

    import ray
    from flwr.simulation import run_simulation

    from backends.fl.app import make_client_app, make_secagg_client_app, make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    threads = max(1, job.threads)
    start = time.perf_counter()
    # One actor at a time holding all the worker's cores: the same compute budget the
    # centralised control gets, and no oversubscription on small machines.
    ray.init(num_cpus=threads, num_gpus=0, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": child_env(threads)})
    startup = time.perf_counter() - start
    client = make_secagg_client_app(job) if job.privacy == "secagg" else make_client_app(job)
    try:
        run_simulation(server_app=make_server_app(job), client_app=client,
                       num_supernodes=len(job.sites),
                       backend_config={"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if not (Path(job.out_dir) / SUMMARY).exists():
        raise EngineError("the simulation ended without the ServerApp writing its summary")
    return EngineReport("simulation", startup)


# ---------------------------------------------------------------------------------------
# deployment
# ---------------------------------------------------------------------------------------

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "cxr-suite-fl"
version = "1.0.0"
description = "The CXR privacy suite's federation (backends.fl.app), as a Flower App"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "cxr-suite"

[tool.flwr.app.components]
serverapp = "fl_entry:server_app"
clientapp = "fl_entry:client_app"

[tool.flwr.app.config]
job = ""
"""

APP_ENTRY = """\
from backends.fl.backend import app as fl_app

server_app = fl_app.make_server_app()
client_app = fl_app.{client_factory}()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Deployment:
    """A SuperLink and one SuperNode per site on loopback, started and stopped here."""

    def __init__(self, workdir: Path, job: FLJob, job_path: Path) -> None:
        self.workdir = Path(workdir)
        self.job, self.job_path = job, Path(job_path)
        self.home = self.workdir / "flwr-home"
        self.app = self.workdir / "flwr-app"
        self.logs = self.workdir / "logs"
        self.procs: list[subprocess.Popen] = []
        self.port = 0
        self.env = {**os.environ, **child_env(job.threads), "FLWR_HOME": str(self.home),
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.workdir, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> float:
        """Write the Flower App and config, start the processes; returns seconds until ready."""
        for d in (self.home, self.app, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        factory = "make_secagg_client_app" if self.job.privacy == "secagg" else "make_client_app"
        (self.app / "pyproject.toml").write_text(APP_PYPROJECT)
        (self.app / "fl_entry.py").write_text(APP_ENTRY.format(client_factory=factory))
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "suite"\n\n[superlink.suite]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        start = time.perf_counter()
        self._spawn("superlink", [_bin("flower-superlink"), "--insecure", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        n = len(self.job.sites)
        for k in range(n):
            self._spawn(f"supernode-{k}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()),
                "--node-config",
                f'partition-id={k} num-partitions={n} data-path="{self._site_file(k)}"'])
        deadline = time.monotonic() + 180
        while not _port_open(self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise EngineError("SuperLink did not open its port within 180 s")
            time.sleep(0.3)
        self._wait_supernodes(deadline)
        return time.perf_counter() - start

    def _site_file(self, k: int) -> str:
        from backends.fl.app import site_path

        return str(site_path(self.job.data_dir, self.job.sites[k]))

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                name = Path(p.args[0]).name
                raise EngineError(f"{name} exited with code {p.returncode}; see {self.logs}")

    def _wait_supernodes(self, deadline: float) -> None:
        """Each SuperNode logs its ID once the SuperLink has registered it."""
        n = len(self.job.sites)
        while True:
            ready = sum("SuperNode ID" in (self.logs / f"supernode-{k}.log").read_text(errors="replace")
                        for k in range(n))
            if ready == n:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise EngineError(f"only {ready} of {n} SuperNodes registered within 180 s")
            time.sleep(0.3)

    def run(self, timeout: float) -> None:
        """Submit the run with `flwr run` and wait until the ServerApp has written its summary."""
        summary = Path(self.job.out_dir) / SUMMARY
        with open(self.logs / "flwr-run.log", "w") as log:
            cli = subprocess.Popen(
                [_bin("flwr"), "run", str(self.app), "suite", "--stream",
                 "--run-config", f"{JOB_KEY}='{self.job.to_ref()}'"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                start_new_session=True)
            self.procs.append(cli)
            deadline = time.monotonic() + timeout
            while not summary.exists():
                if cli.poll() is not None and not summary.exists():
                    # the stream ended; give the ServerApp a moment to finish writing
                    end = time.monotonic() + 10
                    while not summary.exists() and time.monotonic() < end:
                        time.sleep(0.3)
                    break
                if time.monotonic() > deadline:
                    raise EngineError(f"federation did not finish within {timeout:.0f} s; "
                                      f"logs in {self.logs}")
                for p in self.procs[:-1]:
                    if p.poll() is not None:
                        raise EngineError(f"{Path(p.args[0]).name} died during the run; logs in {self.logs}")
                time.sleep(0.5)
        if not summary.exists():
            tail = (self.logs / "flwr-run.log").read_text(errors="replace")[-2000:]
            raise EngineError(f"the ServerApp wrote no summary; flwr run said:\n{tail}")

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process started here and all their descendants.

        A ClientApp process spawned while the tree is being stopped could escape the
        snapshot, so a second pass stops any process still carrying this run's FLWR_HOME.
        """
        stop_tree(self.procs, grace)
        self.procs = []
        stop_by_home(self.home, grace)


def stop_by_home(home: Path, grace: float = 5.0) -> None:
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == str(home):
                mine.append(proc)
        except psutil.Error:
            continue
    terminate_then_kill(mine, grace)


def stop_tree(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    import psutil

    victims: dict[int, psutil.Process] = {}
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            for child in root.children(recursive=True):
                victims[child.pid] = child
            victims[root.pid] = root
        except psutil.Error:
            pass
    terminate_then_kill(list(victims.values()), grace)
    for p in procs:       # reap our direct children (no zombies left for the harness)
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def run_deployment_engine(workdir: Path, job: FLJob, job_path: Path) -> EngineReport:
    dep = Deployment(workdir, job, job_path)
    try:
        startup = dep.start()
        dep.run(timeout=job.round_timeout * max(1, job.rounds) + 120)
    finally:
        dep.stop()
    return EngineReport("deployment", startup, [str(dep.logs)])
