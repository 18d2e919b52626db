"""A warm start for worker processes: one zygote per run imports what every worker imports
(torch, torchxrayvision, numpy, pandas, the harness) once, then forks one child per backend
configuration. The child is the measured worker, exactly as `python -m suite.worker JOB.json`
would be, without paying ~9 s of CPU for imports each time.

What stays the same as a fresh worker process:
- isolation: each configuration is its own process (own session and process group), so a
  crash (os._exit, segfault) loses only that configuration, and the runner's hard time
  limit kills its whole tree with `kill_tree`;
- memory: the runner samples the resident set of the child's tree, as before. The heap the
  child inherits (the imports' Python objects) is resident in it at once, as in a fresh
  worker. Shared-library pages are not: fork maps file pages lazily, so a forked null worker
  read ~350 MB (of 0.95 GB) lower than a fresh one, measured. The child therefore maps exactly
  the file pages the zygote holds resident (MADV_POPULATE_READ over the ranges
  `resident_file_ranges` found once in /proc/self/pagemap), so `peak_rss` counts what a
  fresh worker that made the same imports would (RSS, not PSS: pages shared with other
  processes count in full, as before). One difference remains: a fresh worker's peak can
  fall during its imports (transient allocations freed before the job starts), which a
  forked one never sees: null read 781 MiB forked against 902 MiB fresh (measured under
  load), the backend's own memory being the same;
- time: `wall_time` runs from the request to start the worker to its end, as before, now
  without the interpreter start and the preloaded imports (paid once per run by the zygote;
  `run.json` records that once, under `worker_start`). The harness's own phase timings are
  untouched;
- randomness: the zygote runs no torch op and draws nothing; each child reseeds numpy's
  global generator from the OS (Python's `random` reseeds itself after a fork), and secret
  randomness comes from os.urandom/secrets as everywhere else;
- threads: the zygote starts no Python thread, runs no torch op (so no OpenMP pool exists)
  and sets no thread count. The native pools its imports start (OpenBLAS in numpy and scipy,
  Arrow's jemalloc background thread) register fork handlers, as they must for every PyTorch
  DataLoader worker forked the same way; the child calls
  `torch.set_num_threads` (in `suite.worker.run_job`), and OMP_NUM_THREADS comes from the
  run's worker environment, set when the zygote starts (before OpenMP loads);
- nothing left behind: the zygote dies with the runner (PR_SET_PDEATHSIG, the request pipe's
  end of file, a getppid() check), and each child watches the zygote as a fresh worker
  watches the runner (`suite.procwatch.watch_parent`), so the chain holds even after SIGKILL.

Protocol: JSON lines. The runner writes {"job", "env", "log", "entry"}; the zygote answers
{"pid"} (or {"error"}) at once and {"exit": pid, "returncode"} when the child ends
(returncode is negative for a signal, as `subprocess` reports it), without reaping it, so its
pid cannot be reused while the runner stops what it left behind. The runner then writes
{"reap": pid}; the zygote reaps it and answers {"reaped": pid, "cpu_s"}.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

DISABLE_ENV = "SUITE_FORK_SERVER"        # "0": a fresh interpreter per worker, as before
# What every worker imports before its backend does anything (suite.worker.run_job's imports
# and what they pull); backend libraries (crypten, tenseal, opacus, flwr) stay in the child.
PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "psutil", "tqdm", "torch", "torchxrayvision",
           "suite.backend", "suite.data.catalog", "suite.harness", "suite.meter", "suite.models",
           "suite.model_source", "suite.registry_backends", "suite.run_folder", "suite.worker")


WORKER_ENTRY = "suite.worker:main"       # what a child runs, given [job path]


def enabled(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(DISABLE_ENV, "1").strip().lower() not in ("0", "no", "false", "off")


# ---------------------------------------------------------------- the zygote (its own process)

def _set_parent_death_signal() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _thread_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


RESIDENT_FILE_RANGES: list[tuple[int, int]] = []   # (address, length), found after the preload
MADV_POPULATE_READ = 22                             # Linux >= 5.14


def resident_file_ranges() -> list[tuple[int, int]]:
    """Runs of file-backed pages (shared libraries, mapped files) resident in this process."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    out: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or not fields[5].startswith("/") or not fields[1].startswith("r"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek(start // page * 8)
                present = (np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
                           >> np.uint64(63)).astype(np.int8)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], present, [0]))))
                out += [(start + int(a) * page, int(b - a) * page) for a, b in zip(edges[::2], edges[1::2])]
    except (OSError, ValueError):
        return []
    return out


def map_resident_file_pages(ranges: list[tuple[int, int]]) -> None:
    """In a child: map the file pages the zygote had resident (from the page cache: no I/O)."""
    if not ranges:
        return
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for address, length in ranges:
        madvise(address, length, MADV_POPULATE_READ)    # a range that fails is left lazy


def serve() -> int:
    """The zygote's loop: preload, say ready, then fork a child per request and report its exit."""
    runner = os.getppid()
    _set_parent_death_signal()
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)                 # a stray print of an import goes to stderr, not into the protocol
    os.close(devnull)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(proto_out, data):]

    start, cpu0 = time.perf_counter(), time.process_time()
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if os.getppid() != runner:
        return 1
    import gc
    import threading

    global RESIDENT_FILE_RANGES
    RESIDENT_FILE_RANGES = resident_file_ranges()
    gc.freeze()     # what the preload made is never collected: children's GC leaves its pages shared
    send({"ready": True, "preload_s": round(time.perf_counter() - start, 3),
          "preload_cpu_s": round(time.process_time() - cpu0, 3),
          "python_threads": threading.active_count(), "native_threads": _thread_count(),
          "modules": len(sys.modules)})
    children: dict[int, int | None] = {}      # pid -> pidfd (None where pidfd_open is missing)
    exited: set[int] = set()                  # reported, not reaped: the pid stays reserved
    buf = b""
    while True:
        running = [pid for pid in children if pid not in exited]
        fds = [proto_in] + [children[pid] for pid in running if children[pid] is not None]
        timeout = 0.05 if any(children[pid] is None for pid in running) else 0.5
        readable, _, _ = select.select(fds, [], [], timeout)
        if os.getppid() != runner:
            return 1                               # the runner is gone: children follow us
        _report_exits(children, exited, send)
        if proto_in in readable:
            chunk = os.read(proto_in, 65536)
            if not chunk:
                return 0                           # the runner closed the pipe: done
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                if "reap" in req:
                    _reap(req["reap"], children, exited, send)
                else:
                    _start_child(req, children, send, (proto_in, proto_out))


def _report_exits(children: dict[int, int | None], exited: set[int], send) -> None:
    """Report each child that ended, without reaping it (WNOWAIT): until the runner has
    stopped what the child left in its process group and asks to reap, the pid cannot be
    reused, so the runner's kill_tree never reaches a stranger (as with a Popen child)."""
    for pid in children:
        if pid in exited:
            continue
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
            exited.add(pid)
            send({"exit": pid, "returncode": None})
            continue
        if info is None or info.si_pid == 0:
            continue
        exited.add(pid)
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        send({"exit": pid, "returncode": code})


def _reap(pid: int, children: dict[int, int | None], exited: set[int], send) -> None:
    usage = None
    if pid in children:
        try:
            _, _, usage = os.wait4(pid, 0 if pid in exited else os.WNOHANG)
        except ChildProcessError:
            pass
        fd = children.pop(pid)
        exited.discard(pid)
        if fd is not None:
            os.close(fd)
    send({"reaped": pid, "cpu_s": round(usage.ru_utime + usage.ru_stime, 3) if usage else None})


def _start_child(req: dict, children: dict[int, int | None], send, proto: tuple[int, int]) -> None:
    try:
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if req.get("log") \
            else os.open(os.devnull, os.O_WRONLY)
    except OSError as exc:
        send({"error": f"cannot open the worker log {req.get('log')}: {exc.strerror or exc}"})
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()                             # nothing buffered is written twice
    pid = os.fork()
    if pid == 0:
        _child(req, log, proto, [fd for fd in children.values() if fd is not None])   # raises
    os.close(log)
    try:
        children[pid] = os.pidfd_open(pid)
    except (AttributeError, OSError):
        children[pid] = None
    send({"pid": pid})


class BecomeWorker(BaseException):
    """Raised in a fresh child to leave the zygote's loop: the worker then runs at the top of
    the program (`__main__` below), outside the loop's frames."""

    def __init__(self, req: dict) -> None:
        super().__init__()
        self.req = req

    def run(self) -> int:
        import importlib

        module, _, func = (self.req.get("entry") or WORKER_ENTRY).partition(":")
        sys.argv = [module, self.req["job"]]
        return getattr(importlib.import_module(module), func)([self.req["job"]])

    def run_and_exit(self) -> None:
        """Run the worker, then end as an interpreter ends what a program leaves (non-daemon
        threads joined, atexit handlers and weakref finalizers run, streams flushed), but
        without tearing down the ~3000 inherited modules: that teardown touches every object
        the zygote made, copying each page (about 2.5 s CPU per child, measured)."""
        code = 1
        try:
            code = self.run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as an uncaught exception would be
            import traceback

            traceback.print_exc()
        finally:
            _end_process(code if isinstance(code, int) else 1)


def _end_process(code: int) -> None:
    import atexit
    import threading

    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream has nothing left to write
                pass
        os._exit(code)


def _child(req: dict, log: int, proto: tuple[int, int], inherited: list[int]) -> None:
    """Become the worker: own session, the job's environment and log, then raise BecomeWorker
    (a child never returns into the zygote's loop: a failure here ends it at once)."""
    try:
        zygote = os.getppid()
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in (*proto, *inherited):
            os.close(fd)
        os.dup2(log, 1)
        os.close(log)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(req.get("env") or {})
        from suite.procwatch import PARENT_ENV

        os.environ[PARENT_ENV] = str(zygote)       # the worker watches the zygote, which watches the runner
        import numpy as np

        np.random.seed()                           # fresh OS entropy, like a fresh interpreter
        map_resident_file_pages(RESIDENT_FILE_RANGES)
    except BaseException:  # noqa: BLE001 - never fall back into the zygote's loop
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    raise BecomeWorker(req)


# ---------------------------------------------------------------- the runner's side

class ForkServerError(RuntimeError):
    pass


class ForkServer:
    """The runner's handle on its zygote: started once, asked for one worker at a time."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "suite.forkserver"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     start_new_session=True)
        self._buf = b""
        self._exits: dict[tuple[str, int], dict] = {}   # reports read before they were asked for
        self.info: dict | None = None
        self.started_at = time.perf_counter()

    def ready(self, timeout_s: float = 300.0) -> dict:
        """Wait for the preload (its figures: preload_s, preload_cpu_s, python_threads,
        native_threads, modules)."""
        if self.info is None:
            msg = self._next(time.perf_counter() + timeout_s)
            if msg is None or not msg.get("ready"):
                raise ForkServerError(f"the worker fork server did not start ({msg or 'no answer'})")
            self.info = {**msg, "ready_after_s": round(time.perf_counter() - self.started_at, 3)}
        return self.info

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, job_path: Path, env: dict[str, str], log_path: Path | None,
              entry: str = WORKER_ENTRY) -> "ForkedWorker":
        """Fork one worker; `entry` ("module:function", called with [job path]) is for tests."""
        self.ready()
        line = json.dumps({"job": str(job_path), "env": dict(env), "entry": entry,
                           "log": str(log_path) if log_path else None}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ForkServerError(f"the worker fork server is gone ({exc})") from None
        while True:
            msg = self._next(time.perf_counter() + 60)
            if msg is None:
                raise ForkServerError("the worker fork server did not answer a start request")
            if "exit" in msg or "reaped" in msg:
                self._keep(msg)
                continue
            if "error" in msg:
                raise ForkServerError(msg["error"])
            return ForkedWorker(self, msg["pid"])

    def _keep(self, msg: dict) -> None:
        key = ("exit", msg["exit"]) if "exit" in msg else ("reaped", msg["reaped"])
        self._exits[key] = msg

    def wait_for(self, kind: str, pid: int, deadline: float) -> dict | None:
        """The zygote's `kind` report ("exit" or "reaped") on child `pid`; None at the
        deadline. A vanished zygote reports the child lost (its children die with it by
        their parent-death signal)."""
        while (kind, pid) not in self._exits:
            msg = self._next(deadline)
            if msg is None:
                if not self.alive():
                    return {kind: pid, "returncode": None, "cpu_s": None, "lost": True}
                return None
            if "exit" in msg or "reaped" in msg:
                self._keep(msg)
        return self._exits.pop((kind, pid))

    def reap(self, pid: int) -> float | None:
        """Let the zygote reap child `pid` (after the runner stopped its tree); its CPU seconds."""
        try:
            self.proc.stdin.write((json.dumps({"reap": pid}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        msg = self.wait_for("reaped", pid, time.perf_counter() + 60)
        return (msg or {}).get("cpu_s")

    def _next(self, deadline: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Stop the zygote: at once while it is still preloading (a refused run wastes no
        CPU on imports), else by closing its request pipe."""
        if self.proc.poll() is None and self.info is None:
            from suite.procwatch import kill_tree

            kill_tree(self.proc.pid, grace_s=1.0)
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                from suite.procwatch import kill_tree

                kill_tree(self.proc.pid)
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ForkedWorker:
    """A forked child seen through the zygote, with the part of Popen's interface that
    `suite.procwatch` uses (pid, wait, returncode)."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None
        self.cpu_s: float | None = None
        self.lost = False
        self._done = False

    def poll(self) -> int | None:
        self.wait(0.0, raise_timeout=False)
        return self.returncode

    def wait(self, timeout: float | None = None, raise_timeout: bool = True) -> int | None:
        if self._done:
            return self.returncode
        deadline = time.perf_counter() + (1e9 if timeout is None else timeout)
        msg = self.server.wait_for("exit", self.pid, deadline)
        if msg is None:
            if raise_timeout:
                raise subprocess.TimeoutExpired(f"forked worker {self.pid}", timeout)
            return None
        self._done = True
        self.returncode = msg.get("returncode")
        self.lost = bool(msg.get("lost"))
        return self.returncode

    def release(self) -> None:
        """After the watch stopped the tree: the zygote reaps the child (its pid is free
        again only now) and reports its CPU seconds."""
        if self._done and not self.lost:
            self.cpu_s = self.server.reap(self.pid)


if __name__ == "__main__":
    try:
        code = serve()
    except BecomeWorker as child:                  # in a forked child only
        child.run_and_exit()
    _end_process(code)     # the zygote too: nothing of its own to tear down (~2 s saved)
