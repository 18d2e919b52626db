"""`flower-supernode` with a shorter idle poll: the deployment engine's SuperNode, as
`python -m backends.fl.supernode <flower-supernode arguments>`.

Why: Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none,
sleeps a fixed `time.sleep(3)` (flwr/supernode/start_client_internal.py, the pull loop of
`start_client_internal`); while its ClientApp computes a reply it checks every 0.5 s.
Neither has a CLI flag, environment variable or config key, and 1.42 has only the HTTP
request-response transport (no streaming or push transport that would avoid the poll).
On loopback those sleeps, not the sites, set the length of a round: each round is two
message exchanges (train, evaluate), each costing up to 3 s of poll per site.

What this does (a MONKEYPATCH of a Flower internal, said in every row this engine
produces): the `time` name inside that one module is replaced by a copy of the `time`
module whose `sleep` shortens exactly those two waits (3 s -> `IDLE_POLL_S`, 0.5 s ->
`REPLY_POLL_S`); everything else in Flower is untouched. It refuses to run if the
installed Flower's pull loop no longer contains the literal `time.sleep(3)` it replaces,
so an upgrade cannot silently change what is patched.
"""

from __future__ import annotations

import sys
import types

IDLE_POLL_S = 0.25      # instead of 3 s: how often an idle SuperNode asks for a message
REPLY_POLL_S = 0.05     # instead of 0.5 s: how often it checks for its ClientApp's reply
PATCHED = (f"SuperNode idle poll {IDLE_POLL_S:g} s instead of Flower's fixed 3 s "
           f"(monkeypatch of flwr.supernode.start_client_internal; no supported setting "
           f"in Flower 1.42)")


class FlowerChanged(RuntimeError):
    """The installed Flower's SuperNode loop is not the one this patch was written for."""


def patch_supernode_poll(idle_s: float = IDLE_POLL_S, reply_s: float = REPLY_POLL_S) -> None:
    import inspect
    import time

    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    if "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        raise FlowerChanged("flwr.supernode.start_client_internal no longer sleeps 3 s / 0.5 s; "
                            "re-check the SuperNode poll before patching it")
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if seconds == 3:
            real_sleep(idle_s)
        elif seconds == 0.5:
            real_sleep(reply_s)
        else:
            real_sleep(seconds)

    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep
    loop.time = shim


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    patch_supernode_poll()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
