"""`flower-supernode` with a shorter idle poll: the deployment engine's SuperNode, as
`python -m backends.fl.supernode <flower-supernode arguments>`.

Why: Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none,
sleeps a fixed `time.sleep(3)` (flwr/supernode/start_client_internal.py, the pull loop of
`start_client_internal`); while its ClientApp computes a reply it checks every 0.5 s.
Neither has a CLI flag, environment variable or config key, and 1.42 has only the HTTP
request-response transport (no streaming or push transport that would avoid the poll).
On loopback those sleeps, not the sites, set the length of a round: each message exchange
(one per round where evaluation rides on the next round's train message, else two) cost up
to 3 s of poll per site.

What this does (a MONKEYPATCH of a Flower internal, said in every row this engine
produces): the `time` name inside that one module is replaced by a copy of the `time`
module whose `sleep` shortens exactly those two waits (3 s -> `IDLE_POLL_S`, 0.5 s ->
`REPLY_POLL_S`); everything else in Flower is untouched. It refuses to run if the
installed Flower's pull loop no longer contains the literal `time.sleep(3)` it replaces,
so an upgrade cannot silently change what is patched.

The same launcher shortens one more Flower constant in that module, and `patch_object_pull`
does it in the ServerApp process of the deployment engine (flwr.superlink.grid.http_grid):
the retry backoff of `pull_objects` (first retry after 1 s, doubling, capped at 10 s;
module constants PULL_INITIAL_BACKOFF / PULL_BACKOFF_CAP, no setting). A message is
announced before its objects are uploaded (the SuperNode stores the message and makes it
claimable, then fetches its objects; a reply reaches the SuperLink before its objects), so
the first pull often finds an object missing and waited 1-3 s of backoff per exchange on
loopback. Here the first retry is after PULL_BACKOFF_S, capped at PULL_BACKOFF_CAP_S; the
number of tries and the overall deadline are Flower's. The site runner calls Flower's pull
with the same arguments (its own code, no patch). Profile: `benchmarks/bench_fl.py --profile`.

`--site-runner` (our flag, taken out before Flower parses the rest): the site's long-lived
ClientApp runner (backends/fl/site_runner.py) runs as a thread of this process instead of
a process of its own, claiming tasks over the same local Runtime API, so a site is one
process, not two. The two waits between them become wake-ups inside the process: the
SuperNode's reply wait (the patched 0.5 s sleep, entered right after it has stored a
message and all its objects) tells the runner a task is there, and the runner tells the
reply wait its reply is pushed; each wait keeps a short timeout as a fallback. The process
dies with the worker as before (PR_SET_PDEATHSIG on the launcher), the thread with it.
"""

from __future__ import annotations

import sys
import types

from backends.fl.object_pull import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S, FlowerChanged, patch_object_pull


# The idle poll backs off: IDLE_POLL_S right after the SuperNode handled a message (the next
# one of a round follows soon), doubling on every empty poll up to IDLE_POLL_MAX_S. A fixed
# short poll made 7 SuperNodes and the SuperLink spend ~0.4 of a core on empty polls
# (round profile, logs/cpu-seconds.json), which on a loaded 2-core host slowed the rounds.
IDLE_POLL_S = 0.05      # first idle poll after activity (Flower: a fixed 3 s)
IDLE_POLL_MAX_S = 1.0   # the back-off stops here (Flower: 3 s)
REPLY_POLL_S = 0.05     # instead of 0.5 s: how often it checks for its ClientApp's reply
PATCHED = (f"SuperNode idle poll {IDLE_POLL_S:g} s after a message, doubling to {IDLE_POLL_MAX_S:g} s, instead of "
           f"Flower's fixed 3 s; the site's ClientApp runner is a thread of the SuperNode "
           f"process calling its Runtime API handlers in-process (not over loopback HTTP) "
           f"and waking its reply wait (instead of a 0.5 s poll); object-pull "
           f"retry backoff {PULL_BACKOFF_S:g}-{PULL_BACKOFF_CAP_S:g} s instead of 1-10 s "
           f"(monkeypatch of flwr.supernode.start_client_internal, "
           f"flwr.supernode.cli.flower_supernode and, in the ServerApp, "
           f"flwr.superlink.grid.http_grid; no supported setting in Flower 1.42)")


class IdleBackoff:
    """The idle poll's wait: `first` after activity, doubled by each empty poll up to `cap`.
    Activity = a reply wait (a message is being handled) or a gap since the last idle wait
    longer than that wait plus 0.5 s (a message came and went in between)."""

    def __init__(self, first: float, cap: float, clock) -> None:
        self.first, self.cap, self.clock = first, cap, clock
        self.delay, self.last_end = first, None

    def activity(self) -> None:
        self.delay = self.first

    def next_wait(self) -> float:
        now = self.clock()
        if self.last_end is not None and now - self.last_end > 0.5:
            self.delay = self.first
        wait, self.delay = self.delay, min(self.delay * 2, self.cap)
        self.last_end = now + wait
        return wait


class Wakeups:
    """The in-process signals between the SuperNode loop and its site-runner thread."""

    def __init__(self) -> None:
        import threading

        self.task_ready = threading.Event()    # the SuperNode stored a message: claim it
        self.reply_ready = threading.Event()   # the runner pushed a reply: send it on

    def reply_wait(self, timeout: float) -> None:
        """The SuperNode's wait for its ClientApp's reply (Flower: a 0.5 s poll)."""
        self.task_ready.set()
        self.reply_ready.wait(timeout)
        self.reply_ready.clear()


def patch_supernode_poll(idle_s: float = IDLE_POLL_S, reply_s: float = REPLY_POLL_S,
                         idle_max_s: float = IDLE_POLL_MAX_S, wakeups: Wakeups | None = None) -> None:
    """`wakeups`: the reply wait is woken by the in-process site runner (`reply_s` becomes
    the fallback timeout) and wakes the runner in turn."""
    import inspect
    import time

    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    if "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        raise FlowerChanged("flwr.supernode.start_client_internal no longer sleeps 3 s / 0.5 s; "
                            "re-check the SuperNode poll before patching it")
    real_sleep = time.sleep
    idle = IdleBackoff(idle_s, idle_max_s, time.monotonic)

    def sleep(seconds: float) -> None:
        if seconds == 3:
            real_sleep(idle.next_wait())
        elif seconds == 0.5:
            idle.activity()
            if wakeups is not None:
                wakeups.reply_wait(reply_s)
            else:
                real_sleep(reply_s)
        else:
            real_sleep(seconds)

    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep
    loop.time = shim


SITE_RUNNER_FLAG = "--site-runner"
SITE_RUNNER_FALLBACK_S = 2.0   # the runner's longest wait without a wake-up (a missed one)


def start_site_runner_thread(argv: list[str], wakeups: Wakeups, runtime=None):
    """The site runner as a daemon thread of this process, on this SuperNode's Runtime API
    (its `--port`, or in-process calls with `runtime`); it retries until the API is up."""
    import threading

    from backends.fl.site_runner import serve

    port = argv[argv.index("--port") + 1]
    thread = threading.Thread(target=serve, name="site-runner", daemon=True,
                              args=(f"127.0.0.1:{port}",),
                              kwargs=dict(wakeups=wakeups, poll_max_s=SITE_RUNNER_FALLBACK_S,
                                          runtime=runtime))
    thread.start()
    return thread


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    args = sys.argv[1:]
    wakeups = None
    if SITE_RUNNER_FLAG in args:
        args.remove(SITE_RUNNER_FLAG)
        if "--port" not in args:
            raise SystemExit(f"{SITE_RUNNER_FLAG} needs the SuperNode's --port (its Runtime API)")
        wakeups = Wakeups()
    patch_supernode_poll(wakeups=wakeups)
    patch_object_pull(start_client_internal)
    if wakeups is not None:
        from backends.fl.local_runtime import LocalRuntime

        runtime = LocalRuntime()
        runtime.capture()
        start_site_runner_thread(args, wakeups, runtime)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
