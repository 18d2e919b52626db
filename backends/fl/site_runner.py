"""One long-lived ClientApp process per SuperNode (deployment engine).

Flower's SuperNode, in its default `subprocess` isolation, has its SuperExec start a fresh
`flwr-clientapp` process for every message: each one imports torch, installs the FAB and
reloads the site's data, so a round of 7 sites costs minutes on a small host. With
`flower-supernode --isolation process` the SuperNode leaves running ClientApps to an
outside process; this module is that process for one site. It claims the SuperNode's
tasks through the same Runtime API calls SuperExec and `flwr-clientapp` make
(AcquireTask, PullTaskInput, PullMessages, PushMessages, PushTaskOutput, heartbeats) and
runs each message in-process, so imports, the loaded ClientApp and the site's data stay
warm for the whole run.

The deployment engine runs it as a thread of the SuperNode's own process
(`python -m backends.fl.supernode --site-runner ...`, `serve(..., wakeups=...)`): one
process per site, and the SuperNode and its runner wake each other instead of polling.
Standalone, next to a plain `flower-supernode --isolation process` (real machines):
`python -m backends.fl.site_runner --runtime-api 127.0.0.1:<supernode --port>
[--parent-pid PID]`. It exits when its parent dies or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

POLL_S = 0.02            # first poll for a task after serving one (the next follows soon) ...
POLL_MAX_S = 0.5         # ... doubling on every empty poll up to this (CPU of idle polls)


def _client(address: str, token: str | None):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
        component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


class AppCache:
    """The ClientApp of each FAB, installed and loaded once per process."""

    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}

    def get(self, run, fab):
        if fab.hash_str not in self.apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def pull_task_input(client):
    """Flower's `flwr.supernode.runtime.run_clientapp.pull_task_input`, calling Flower's
    object pull with a short retry backoff (backends.fl.object_pull.PULL_BACKOFF_S): the
    SuperNode makes a task claimable before it has fetched the message's objects from the
    SuperLink, so the first pull often finds one missing, and Flower's default backoff
    (1 s, doubling) cost 1-7 s per message in the round profile."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.app import Message
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    from backends.fl.object_pull import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id   # as Flower's pull_task_input
    return message, context, run, fab


def run_task(address: str, token: str, apps: AppCache, times: dict[str, float] | None = None,
             runtime=None) -> str:
    """One message: pull it, run the ClientApp, push the reply and the task's status.
    `times` gets the wall clock after each step (pulled, computed, pushed); `runtime`
    (backends.fl.local_runtime.LocalRuntime): call the Runtime API in-process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = runtime.client(token) if runtime is not None else _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        stamp(times, "pulled")
        reply = apps.get(run, fab)(message=message, context=context)
        stamp(times, "computed")
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - an error reply, as flwr-clientapp sends
        details = f"{type(exc)}:<'{exc}'>"
        print(f"site runner: ClientApp raised {details}", file=sys.stderr, flush=True)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            stamp(times, "pushed")
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status


def stamp(times: dict[str, float] | None, what: str) -> None:
    if times is not None:
        times[what] = time.time()


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _exit_now(signum, _frame) -> None:
    raise SystemExit(128 + signum)


READY = "site runner: ready"     # printed once warm; the engine waits for it at start-up


def serve(address: str, parent_pid: int | None = None, wakeups=None,
          poll_max_s: float = POLL_MAX_S, runtime=None) -> None:
    """Claim and run this SuperNode's tasks until the process ends.

    `wakeups` (backends.fl.supernode.Wakeups; the runner is a thread of the SuperNode's
    process): wait for the SuperNode's "task stored" signal instead of sleeping, and signal
    "reply pushed" back; the poll back-off remains as a fallback up to `poll_max_s`.
    `runtime` (backends.fl.local_runtime.LocalRuntime): Runtime API calls in-process."""
    import threading

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a stop, or the parent-death signal) ends the runner at once: a flag checked
        # by the loop would wait out the Runtime API client's retries once the SuperNode is gone
        signal.signal(signal.SIGTERM, _exit_now)
    # warm: torch, the model code and the apps load before the run starts, not in round 1
    import torch  # noqa: F401

    import backends.fl.app  # noqa: F401
    import suite.models  # noqa: F401
    import suite.training  # noqa: F401

    client = runtime.client(None) if runtime is not None else _client(address, None)
    apps = AppCache()
    served = 0
    wait = poll_max_s
    ready = False
    try:
        while _parent_alive(parent_pid):
            if wakeups is not None:
                wakeups.task_ready.clear()        # a signal after this is for a new task
            try:
                res = client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode is starting or gone
                print(f"site runner: AcquireTask failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.25 if wakeups is not None else 1.0)
                continue
            if not ready:
                print(READY, flush=True)
                ready = True
            if res.HasField("task") and res.token:
                times = {"acquired": time.time()}
                run_task(address, res.token, apps, times, runtime=runtime)
                if wakeups is not None:
                    wakeups.reply_ready.set()     # the SuperNode's reply wait sends it on
                served += 1
                # one JSON line per message: the round profile reads these wall clocks
                print(f"site runner: served message {served} {json.dumps(times)}", flush=True)
                wait = POLL_S
            else:
                if wakeups is not None:
                    wakeups.task_ready.wait(wait)
                else:
                    time.sleep(wait)
                wait = min(wait * 2, poll_max_s)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's Runtime API host:port")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    serve(args.runtime_api, args.parent_pid)


if __name__ == "__main__":
    main()
