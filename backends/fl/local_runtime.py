"""The SuperNode's Runtime API called in-process by its site-runner thread.

Why: with the site runner a thread of the SuperNode's process (backends/fl/supernode.py
`--site-runner`), every Runtime API call it makes (AcquireTask, PullTaskInput,
PullMessages, PullObject, ConfirmMessageReceived, PushMessages, PushObject,
PushTaskOutput, SendTaskHeartbeat: about 16 per message) would still travel over loopback
HTTP to a server in the same process: protobuf encoding, an httpx request, uvicorn,
FastAPI's dependencies and middleware, and back. In the round profile that chatter, not
the sites' compute, set the CPU of a deployment round. `LocalRuntimeClient` offers the
same methods and calls the very handler functions Flower's Runtime routes call
(`flwr.supernode.servicer.runtime.runtime_handlers`, on the SuperNode's own NodeState),
authenticating the task by its token as the route's dependency does.

The SuperNode-SuperLink traffic (the deployment engine's network protocol) is untouched:
this only replaces the local hop inside one site. What is patched (labelled wherever the
engine's rows appear, see backends.fl.supernode.PATCHED): `_start_supernode_http_api` in
`flwr.supernode.cli.flower_supernode` is wrapped to keep the NodeStateFactory Flower
creates; `capture` refuses to run if that function or a handler it calls has changed.
"""

from __future__ import annotations

import inspect
import threading

# the Runtime calls the site runner makes, and the handler each maps to (module, name)
HANDLERS = {
    "AcquireTask": ("supernode", "acquire_task"),
    "PullTaskInput": ("supernode", "pull_task_input"),
    "PullMessages": ("supernode", "pull_messages"),
    "PullObject": ("supernode", "pull_object"),
    "ConfirmMessageReceived": ("supernode", "confirm_message_received"),
    "PushMessages": ("supernode", "push_messages"),
    "PushObject": ("supernode", "push_object"),
    "PushTaskOutput": ("supernode", "push_task_output"),
    "SendTaskHeartbeat": ("core", "send_task_heartbeat"),
}


class FlowerRuntimeChanged(RuntimeError):
    """The installed Flower's SuperNode Runtime API is not the one this was written for."""


def _handler_modules():
    from flwr.supercore.servicer.runtime import runtime_handlers as core
    from flwr.supernode.servicer.runtime import runtime_handlers as supernode

    return {"core": core, "supernode": supernode}


def check_handlers() -> None:
    """Refuse a Flower whose handlers are not (request, state[, task]) functions."""
    modules = _handler_modules()
    for method, (where, name) in HANDLERS.items():
        fn = getattr(modules[where], name, None)
        params = list(inspect.signature(fn).parameters) if callable(fn) else []
        want = ["request", "state"] + ([] if method == "AcquireTask" else ["task"])
        if params != want:
            raise FlowerRuntimeChanged(f"Flower's Runtime handler {where}.{name} is {params}, "
                                       f"not {want}; re-check the in-process Runtime client")


class LocalRuntime:
    """Keeps the SuperNode's NodeStateFactory (captured as Flower starts its Runtime API)."""

    def __init__(self) -> None:
        self.factory = None
        self.ready = threading.Event()

    def capture(self) -> None:
        import importlib

        # the module (the package `flwr.supernode.cli` exports a function of the same name)
        cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
        check_handlers()
        original = getattr(cli, "_start_supernode_http_api", None)
        original = getattr(original, "__wrapped__", original)
        if original is None or list(inspect.signature(original).parameters) != ["config", "state_factory"]:
            raise FlowerRuntimeChanged("flwr.supernode.cli.flower_supernode._start_supernode_http_api "
                                       "changed; re-check the in-process Runtime client")

        def start(config, state_factory):
            self.factory = state_factory
            self.ready.set()
            return original(config, state_factory)

        start.__wrapped__ = original
        cli._start_supernode_http_api = start

    def client(self, token: str | None = None) -> "LocalRuntimeClient":
        self.ready.wait()
        return LocalRuntimeClient(self.factory, token)


class LocalRuntimeClient:
    """RuntimeHttpClient's methods the site runner uses, as direct handler calls."""

    def __init__(self, factory, token: str | None) -> None:
        self.factory, self.token = factory, token
        self.modules = _handler_modules()

    def _task(self, state):
        from flwr.supercore.error import ApiErrorCode, FlowerError

        task = state.get_task_by_token(self.token) if self.token else None
        if task is None:   # as the route's authenticate_task
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED,
                              "Runtime task-token authentication failed.")
        return task

    def _call(self, method: str, request):
        where, name = HANDLERS[method]
        fn = getattr(self.modules[where], name)
        state = self.factory.state()
        if method == "AcquireTask":
            return fn(request, state)
        return fn(request, state, self._task(state))

    def close(self) -> None:
        """Nothing to close: no connection."""


def _method(name: str):
    def call(self, request):
        return self._call(name, request)

    call.__name__ = name
    call.__doc__ = f"Runtime.{name}, in-process"
    return call


for _name in HANDLERS:
    setattr(LocalRuntimeClient, _name, _method(_name))
