"""How the local executor starts its workers: forked from the run's warm fork server
(`suite.forkserver`, the default), or a fresh `python -m suite.worker` each (SUITE_FORK_SERVER=0,
and the fallback when the server cannot start). Either way each configuration runs in its own
watched process; `run.json` says which under `worker_start`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.markup import escape

from suite import forkserver
from suite.procwatch import PARENT_ENV, ProcResult, run_forked, run_watched


class WorkerLauncher:
    def __init__(self, env: dict[str, str], console, use_fork: bool | None = None) -> None:
        self.env, self.console = env, console
        self.use_fork = forkserver.enabled(env) if use_fork is None else use_fork
        self.server: forkserver.ForkServer | None = None
        self.note: str | None = None

    def begin(self) -> "WorkerLauncher":
        """Start the fork server now, so its preload overlaps the run's own start-up."""
        if self.use_fork and self.server is None:
            self.server = forkserver.ForkServer({**self.env, PARENT_ENV: str(os.getpid())})
        return self

    def run(self, job_path: Path, timeout_s: float, log_path: Path, on_poll=None) -> ProcResult:
        server = self._server()
        if server is not None:
            try:
                return run_forked(server, job_path, timeout_s, self.env, log_path, on_poll=on_poll)
            except forkserver.ForkServerError as exc:
                self._fall_back(str(exc))
        return run_watched([sys.executable, "-m", "suite.worker", str(job_path)], timeout_s, self.env,
                           log_path=log_path, on_poll=on_poll)

    def _server(self) -> forkserver.ForkServer | None:
        if not self.use_fork:
            return None
        self.begin()
        if not self.server.alive():
            self._fall_back(f"the worker fork server exited with code {self.server.proc.returncode}")
            return None
        try:
            self.server.ready()
        except forkserver.ForkServerError as exc:
            self._fall_back(str(exc))
            return None
        return self.server

    def _fall_back(self, why: str) -> None:
        self.use_fork = False
        self.note = f"fresh interpreter per worker: {why}"
        self.console.print(f"[yellow]note[/yellow]: {escape(self.note)}")
        self.close()

    def describe(self) -> dict:
        """For run.json: how workers started, and the one-off preload a fork server paid."""
        if self.server is not None and self.server.info is not None and self.use_fork:
            info = self.server.info
            return {"mode": "fork-server", "preload_s": info["preload_s"],
                    "preload_cpu_s": info["preload_cpu_s"], "preloaded": list(forkserver.PRELOAD),
                    "note": "each configuration is a child forked from a zygote that imported "
                            "these once; wall_time excludes that one-off preload"}
        return {"mode": "fresh-interpreter", "note": self.note
                or "each configuration is a fresh `python -m suite.worker`; wall_time includes "
                   "its interpreter start and imports"}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            if not self.use_fork:
                self.server = None

    def __enter__(self) -> "WorkerLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
