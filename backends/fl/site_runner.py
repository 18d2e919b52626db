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

Run: `python -m backends.fl.site_runner --runtime-api 127.0.0.1:<supernode --port>
[--parent-pid PID]`. It exits when its parent (the backend's worker) dies or on SIGTERM
(the engine starts it with PR_SET_PDEATHSIG = SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

POLL_S = 0.2             # how often an idle runner asks its SuperNode for a task


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


def run_task(address: str, token: str, apps: AppCache) -> str:
    """One message: pull it, run the ClientApp, push the reply and the task's status."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        reply = apps.get(run, fab)(message=message, context=context)
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
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status


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


def serve(address: str, parent_pid: int | None = None) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    # SIGTERM (a stop, or the parent-death signal) ends the runner at once: a flag checked
    # by the loop would wait out the Runtime API client's retries once the SuperNode is gone
    signal.signal(signal.SIGTERM, _exit_now)
    # warm: torch, the model code and the apps load before the run starts, not in round 1
    import torch  # noqa: F401

    import backends.fl.app  # noqa: F401
    import suite.models  # noqa: F401
    import suite.training  # noqa: F401

    client = _client(address, None)
    apps = AppCache()
    served = 0
    try:
        while _parent_alive(parent_pid):
            try:
                res = client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode is starting or gone
                print(f"site runner: AcquireTask failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                run_task(address, res.token, apps)
                served += 1
                print(f"site runner: served message {served}", flush=True)
            else:
                time.sleep(POLL_S)
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
