"""The two Flower engines the `fl` backend runs a federation on, both through `flwr run`.

simulation  Flower's Simulation Engine: a SuperLink started with `--simulation` on a free
            loopback port, and `flwr run <app> suite --stream --federation-config
            "num-supernodes=N ..."`. The SuperLink runs the ServerApp and the ClientApps (Ray
            actors) in its `flwr-simulation` process. This is what Flower recommends in place
            of the deprecated `flwr.simulation.run_simulation` Python call.
deployment  Flower's Deployment Engine as separate processes on loopback: one SuperLink and one
            SuperNode per site (`--node-config "partition-id=k"`). Each SuperNode runs with
            `--isolation process` and its long-lived ClientApp runner (backends/fl/site_runner.py)
            as a thread of the same process (`--site-runner`), so a site is one process that
            imports torch and loads its data once per run, not once per message (Flower's
            `subprocess` isolation starts a process for every message; used only where the
            site runner's Runtime API calls are missing).
            The SuperNode is `flower-supernode` started through backends/fl/supernode.py,
            which turns its fixed 3 s idle poll into a short back-off and shortens the
            retry backoff of its object pulls (a monkeypatch, also applied to the ServerApp's
            grid: Flower 1.42 has no setting for either; every deployment row says so in its
            notes). Where a round's time goes: `benchmarks/bench_fl.py --profile`.

Both submit the run against a Flower config in the run's work folder (FLWR_HOME), so the
user's ~/.flwr is never touched; the job travels inline in the run config (`job='b64:...'`)
and each SuperNode is pointed at its own data file (`data-path`). Every process started (and
every descendant: SuperExec, ServerApp, simulation, Ray and ClientApp processes) is stopped,
and every process started here dies with its starter (`popen_watched`: PR_SET_PDEATHSIG),
so a killed worker or test leaves no SuperLink or SuperExec behind.
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

try:   # resolved here, not in the forked child: a preexec_fn must not import or allocate
    import ctypes
    import signal

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None
PR_SET_PDEATHSIG = 1

# FLWR_DISABLE_UPDATE_CHECK: Flower 1.42 starts a (non-daemon) thread in every process that
# asks the internet whether a newer Flower exists; the suite runs offline.
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL: Flower's supported setting for how often a SuperExec
# looks for a task to launch (default 1 s; the SuperLink's SuperExec launches the ServerApp
# or the simulation once per run, so this is start-up, not round, latency).
SUPEREXEC_POLL_S = 0.1
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
             "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{SUPEREXEC_POLL_S:g}",
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
    retries: int = 0                 # federations restarted because Ray failed to start


class EngineError(RuntimeError):
    pass


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
from backends.fl import app as fl_app

server_app = fl_app.make_server_app()
client_app = fl_app.{client_factory}()
"""


def die_with_parent() -> None:
    """preexec_fn of every process the engine starts: the kernel sends it SIGTERM when the
    process that started it (the backend's worker, or a test's pytest) dies, even by
    SIGKILL. Flower's own children watch their parents (`--parent-pid`: SuperExec,
    ServerApp, ClientApp processes) and Ray shares fate with its driver, so the whole
    federation goes with it instead of being left running."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def popen_watched(args: list[str], **kw) -> subprocess.Popen:
    """subprocess.Popen with the parent-death watch (and its own session, so a stop can
    signal the whole group)."""
    return subprocess.Popen(args, preexec_fn=die_with_parent, start_new_session=True, **kw)


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


def site_runner_available() -> bool:
    """Whether this Flower has the Runtime API calls the long-lived site runner makes."""
    try:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: F401
        from flwr.supernode.runtime.run_clientapp import pull_task_input  # noqa: F401
    except ImportError:
        return False
    return True


class Deployment:
    """A SuperLink (and, for the deployment engine, one SuperNode + site runner per site) on
    loopback, started and stopped here."""

    def __init__(self, workdir: Path, job: FLJob, job_path: Path, simulation: bool = False) -> None:
        self.workdir = Path(workdir)
        self.job, self.job_path = job, Path(job_path)
        self.simulation = simulation
        self.long_lived = not simulation and site_runner_available()
        self.home = self.workdir / "flwr-home"
        self.app = self.workdir / "flwr-app"
        self.logs = self.workdir / "logs"
        self.procs: list[subprocess.Popen] = []
        self.names: dict[int, str] = {}
        self.port = 0
        from suite.paths import REPO_ROOT

        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, **child_env(job.threads), "FLWR_HOME": str(self.home),
                    "PYTHONPATH": path,
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = popen_watched(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.workdir)
        log.close()
        self.procs.append(proc)
        self.names[proc.pid] = name
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
                                  "--disable-runtime-dependency-installation"]
                    + (["--simulation"] if self.simulation else []))
        n = 0 if self.simulation else len(self.job.sites)
        for k in range(n):
            runtime_port = free_port()
            self._spawn(f"supernode-{k}", [
                sys.executable, "-m", "backends.fl.supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(runtime_port),
                "--node-config",
                f'partition-id={k} num-partitions={n} data-path="{self._site_file(k)}"']
                + (["--isolation", "process", "--site-runner"] if self.long_lived else []))
        deadline = time.monotonic() + 180
        while not _port_open(self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise EngineError("SuperLink did not open its port within 180 s")
            time.sleep(0.3)
        self._wait_supernodes(deadline, n)
        return time.perf_counter() - start

    def _site_file(self, k: int) -> str:
        from backends.fl.app import site_path

        return str(site_path(self.job.data_dir, self.job.sites[k]))

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                name = self.names.get(p.pid, Path(p.args[0]).name)
                raise EngineError(f"{name} exited with code {p.returncode}; see {self.logs}")

    def _wait_supernodes(self, deadline: float, n: int) -> None:
        """Each SuperNode logs its ID once the SuperLink has registered it, and its site
        runner thread says it is ready once warm (torch and the apps imported)."""
        from backends.fl.site_runner import READY

        marks = ("SuperNode ID", READY) if self.long_lived else ("SuperNode ID",)
        while True:
            logs = [(self.logs / f"supernode-{k}.log").read_text(errors="replace") for k in range(n)]
            ready = sum(all(m in log for m in marks) for log in logs)
            if ready == n:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise EngineError(f"only {ready} of {n} SuperNodes registered within 180 s")
            time.sleep(0.3)

    def run(self, timeout: float) -> None:
        """Submit the run with `flwr run` and wait until the ServerApp has written its summary."""
        summary = Path(self.job.out_dir) / SUMMARY
        federation = []
        if self.simulation:
            threads = max(1, self.job.threads)
            # one actor at a time holding all the worker's cores: the compute budget the
            # centralised control gets, and no oversubscription on small machines
            federation = ["--federation-config",
                          f"num-supernodes={len(self.job.sites)} client-resources-num-cpus={threads} "
                          f"client-resources-num-gpus=0.0 init-args-num-cpus={threads} "
                          f"init-args-num-gpus=0 init-args-logging-level='ERROR' "
                          f"init-args-log-to-driver=false"]
        with open(self.logs / "flwr-run.log", "w") as log:
            cli = popen_watched(
                [_bin("flwr"), "run", str(self.app), "suite", "--stream",
                 "--run-config", f"{JOB_KEY}='{self.job.to_ref()}'"] + federation,
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
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
                        raise EngineError(f"{self.names.get(p.pid, Path(p.args[0]).name)} died during the run; logs in {self.logs}")
                time.sleep(0.5)
        if not summary.exists():
            tail = (self.logs / "flwr-run.log").read_text(errors="replace")[-2000:]
            raise EngineError(f"the ServerApp wrote no summary; flwr run said:\n{tail}")

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process started here and all their descendants.

        A ClientApp process spawned while the tree is being stopped could escape the
        snapshot, so a second pass stops any process still carrying this run's FLWR_HOME.
        """
        self._write_cpu_seconds()
        stop_tree(self.procs, grace)
        self.procs = []
        stop_by_home(self.home, grace)

    def _write_cpu_seconds(self) -> None:
        """CPU seconds (user + system) each started process and its descendants used, by
        name, into logs/cpu-seconds.json: where a federation's CPU went (round profile)."""
        import json

        import psutil

        used: dict[str, float] = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            name = self.names.get(p.pid, Path(str(p.args[0])).name)
            for proc in tree:
                try:
                    t = proc.cpu_times()
                    used[name] = used.get(name, 0.0) + t.user + t.system
                except psutil.Error:
                    pass
        try:
            (self.logs / "cpu-seconds.json").write_text(json.dumps(used, indent=1))
        except OSError:
            pass


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


RAY_START_FAILED = "timed out during startup"   # Ray's fixed 30 s raylet wait, on a loaded host
RAY_RETRIES = 2       # a loaded 2-core host (load average 40) failed two Ray starts in a row


class EngineSession:
    """One federation's engine: `start` the processes (the backend's prepare_fit, timed by
    the harness as setup), `run` the job (fit), `stop` everything (idempotent; the
    backend's teardown calls it again, so a failed fit leaves nothing running).

    A simulation whose Ray node failed to start (Ray waits a fixed 30 s for its raylet,
    ray/_private/node.py, no setting) is started again from scratch inside `run`, up to
    RAY_RETRIES times; the report says so (`retries`)."""

    def __init__(self, workdir: Path, job: FLJob, job_path: Path, engine: str) -> None:
        self.workdir, self.job, self.job_path, self.engine = Path(workdir), job, Path(job_path), engine
        self.retries = 0
        self.startup_s: float | None = None
        self.dep: Deployment | None = None

    def _new(self) -> Deployment:
        where = self.workdir / (f"retry-{self.retries}" if self.retries else "")
        return Deployment(where, self.job, self.job_path, simulation=self.engine == "simulation")

    def start(self) -> float:
        self.dep = self._new()
        try:
            self.startup_s = self.dep.start()
        except BaseException:
            self.stop()
            raise
        return self.startup_s

    def run(self) -> EngineReport:
        if self.dep is None:
            self.start()
        try:
            while True:
                try:
                    self.dep.run(timeout=self.job.round_timeout * max(1, self.job.rounds) + 120)
                    return EngineReport(self.engine, float(self.startup_s or 0.0),
                                        [str(self.dep.logs)], self.retries)
                except EngineError:
                    log = self.dep.logs / "flwr-run.log"
                    said = log.read_text(errors="replace") if log.exists() else ""
                    if (self.engine != "simulation" or self.retries >= RAY_RETRIES
                            or RAY_START_FAILED not in said):
                        raise
                    self.dep.stop()
                    self.retries += 1
                    self.dep = self._new()
                    self.dep.start()
        finally:
            self.stop()

    def stop(self) -> None:
        if self.dep is not None:
            dep, self.dep = self.dep, None
            dep.stop()
            self.last_logs = dep.logs


def run_engine(workdir: Path, job: FLJob, job_path: Path, engine: str) -> EngineReport:
    """Start the federation's processes, run the job with `flwr run`, stop everything."""
    return EngineSession(workdir, job, job_path, engine).run()
