"""One SecretFlow SPU party (`mpc:engine=spu`) as its own OS process, run from `.venv-spu/`.

    .venv-spu/bin/python -m backends.mpc.spu_party RANK FD      (PYTHONPATH = the repo root)

Started by `backends.mpc.spu_engine.SPUBackend` (the orchestrator, in the benchmark worker), which
talks to it over a socketpair (FD): the first message is the settings, including both
parties' link addresses (`host:port`, each party listens on its own), so the two parties
could as well run on two hosts. This module imports no torch (SPU 0.9.5 needs numpy<2 and
jax<=0.4.34, hence its own environment); arrays cross the pipe as raw bytes, never as
pickled numpy objects, because the two environments have different numpy majors.

  party 0  model owner  gets its folded plan and parameters (float arrays) from its
                        orchestrator, sends the data owner the architecture only
                        (`plan_to_dict`), secret-shares every parameter with `spu.Io` and
                        sends the data owner its shares
  party 1  data owner   gets the images from its orchestrator (its own machine), multiplies
                        them by the plan's public `input_scale`, secret-shares them and sends
                        the model owner its shares; for each batch it announces the batch
                        shape to the model owner; it alone receives the model owner's share
                        of the logits (unless reveal_to=both) and reconstructs them

Both compile the same JAX function (`backends.mpc.spu_jax.plan_function`) with SPU and check
that they got the same executable. Everything between the parties goes over SPU's brpc
link (`libspu.link.create_brpc`); its receive timeout is the backend's `timeout_s`.

Traffic: SPU keeps link statistics (bytes and *send actions*, i.e. messages; it does not
count rounds); it writes them to its log after every run when profiling is on ("Link
details: total send bytes ..."). The party reads them from its own log file and adds the
messages it sends itself outside SPU's runs (shares, the architecture, batch shapes,
output shares), counted the same way (payload bytes, one message per send).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from backends.mpc.codec import pack, unpack  # noqa: F401  (the parties' wire format)
from backends.mpc.party_process import peak_rss_bytes, recv, send, watch_parent

ROLES = {0: "model_owner", 1: "data_owner"}
LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), "
                     r"send actions (\d+), recv actions (\d+)")
PROTOCOLS = {"semi2k": "SEMI2K", "cheetah": "CHEETAH"}


# ------------------------------------------------------------------ plumbing

class Link:
    """SPU's brpc link plus this party's own count of what it sends outside SPU's runs."""

    def __init__(self, settings: dict[str, Any], rank: int) -> None:
        import spu.libspu as libspu

        desc = libspu.link.Desc()
        # a party listens on its own address and reaches its peer at the peer's address, or
        # where `connect_via` says (the tests put a recording proxy in between)
        via = settings.get("connect_via") or settings["parties"]
        for r, addr in enumerate(settings["parties"]):
            desc.add_party(f"party{r}", addr if r == rank else via[r])
        timeout_ms = int(float(settings["timeout_s"]) * 1000)
        desc.recv_timeout_ms = timeout_ms            # default 30 s would kill long Cheetah steps
        desc.http_timeout_ms = timeout_ms
        desc.connect_retry_interval_ms = 500
        desc.connect_retry_times = max(10, int(float(settings["timeout_s"]) * 2))
        desc.throttle_window_size = 0                # no flow-control window: fewer waits
        self.ctx = libspu.link.create_brpc(desc, rank)
        self.rank, self.peer = rank, 1 - rank
        self.sent = self.received = self.messages = self.received_messages = 0
        self.record: list[tuple[str, bytes]] | None = None

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.messages += 1
        self.ctx.send(self.peer, data)

    def recv(self, what: str) -> bytes:
        data = self.ctx.recv(self.peer)
        self.received += len(data)
        self.received_messages += 1
        if self.record is not None:
            self.record.append((what, bytes(data)))
        return data

    def send_obj(self, obj: Any) -> None:
        self.send(json.dumps(obj).encode())

    def recv_obj(self, what: str) -> Any:
        return json.loads(self.recv(what))


class SpuLog:
    """SPU's own log file; `link_stats()` sums the 'Link details' lines written since the
    last call (one per run; SPU's counters are per run)."""

    def __init__(self, path: Path) -> None:
        import spu.libspu as libspu

        self.path = path
        opts = libspu.logging.LogOptions()
        opts.enable_console_logger = False
        opts.system_log_path = str(path)
        self._offset = path.stat().st_size if path.exists() else 0     # a reused work folder
        libspu.logging.setup_logging(opts)

    def link_stats(self, runs: int) -> dict[str, int]:
        """Sum of the statistics of the `runs` SPU runs since the last call."""
        out = {"sent": 0, "received": 0, "messages": 0, "received_messages": 0, "runs": 0}
        deadline = time.monotonic() + 10
        text = b""
        while True:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    text = f.read()
            except FileNotFoundError:
                text = b""
            if text.count(b"Link details") >= runs:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SPU wrote no link statistics to {self.path}")
            time.sleep(0.02)                      # spdlog may flush after the run returns
        text = text[:text.rfind(b"\n") + 1]        # whole lines only
        self._offset += len(text)
        for m in LINK_RE.finditer(text.decode(errors="replace")):
            out["sent"] += int(m.group(1))
            out["received"] += int(m.group(2))
            out["messages"] += int(m.group(3))
            out["received_messages"] += int(m.group(4))
            out["runs"] += 1
        return out


def runtime_config(settings: dict[str, Any]) -> Any:
    import spu.libspu as libspu

    cfg = libspu.RuntimeConfig()
    cfg.protocol = getattr(libspu.ProtocolKind, PROTOCOLS[settings["protocol"]])
    cfg.field = getattr(libspu.FieldType, settings["field"])
    cfg.fxp_fraction_bits = int(settings["fxp_fraction_bits"])   # 0: SPU's default for the field
    cfg.enable_pphlo_profile = True        # makes SPU log its link statistics after each run
    return cfg


# ------------------------------------------------------------------ the party

class Party:
    def __init__(self, rank: int, conn: Any, settings: dict[str, Any]) -> None:
        import spu

        self.rank, self.conn, self.settings = rank, conn, settings
        self.role = ROLES[rank]
        workdir = Path(settings["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = SpuLog(workdir / f"spu-{self.role}.log")
        self.link = Link(settings, rank)
        if settings.get("record_dir"):
            self.link.record = []
        self.cfg = runtime_config(settings)
        self.io = spu.Io(2, self.cfg)
        self.rt = spu.Runtime(self.link.ctx, self.cfg)
        self.executables: dict[tuple, Any] = {}

    # -- shares over the link (libspu.Share: meta + chunks)
    def send_share(self, share: Any) -> None:
        self.link.send(pickle.dumps((bytes(share.meta), [bytes(c) for c in share.share_chunks]), protocol=4))

    def recv_share(self, what: str) -> Any:
        import spu.libspu as libspu

        meta, chunks = pickle.loads(self.link.recv(what))
        share = libspu.Share()
        share.meta, share.share_chunks = meta, chunks
        return share

    def share_input(self, name: str, value: Any, owner: int) -> None:
        """The owner splits `value` into two additive shares and sends the peer its own."""
        import spu.libspu as libspu

        if self.rank == owner:
            shares = self.io.make_shares(value, libspu.Visibility.VIS_SECRET)
            self.send_share(shares[1 - owner])
            self.rt.set_var(name, shares[owner])
        else:
            self.rt.set_var(name, self.recv_share(f"share of {name}"))

    def snapshot(self, runs: int) -> dict[str, int]:
        link = self.log.link_stats(runs)
        return {"sent": link["sent"] + self.link.sent, "received": link["received"] + self.link.received,
                "messages": link["messages"] + self.link.messages,
                "received_messages": link["received_messages"] + self.link.received_messages,
                "spu_runs": link["runs"]}

    def reset_counts(self) -> None:
        self.link.sent = self.link.received = self.link.messages = self.link.received_messages = 0

    def report(self, kind: str, payload: dict) -> None:
        send(self.conn, (kind, payload))

    # -- compilation
    def executable(self, shape: tuple[int, ...]) -> Any:
        if shape in self.executables:
            return self.executables[shape]
        import numpy as np
        import spu.libspu as libspu
        from spu.utils import frontend as fe

        from backends.mpc.spu_jax import param_names, plan_function

        names = param_names(self.plan)
        args = [np.zeros(shape, np.float32)] + [np.zeros(self.plan.shapes[n], np.float32) for n in names]
        exe, _ = fe.compile(fe.Kind.JAX, plan_function(self.plan), args, {}, ["x"] + names,
                            [libspu.Visibility.VIS_SECRET] * len(args),
                            lambda out: [f"logits{i}" for i in range(len(out))])
        # both parties must run the same program: compare digests over the link
        digest = hashlib.sha256(exe.code).hexdigest()
        self.link.send_obj(digest)
        theirs = self.link.recv_obj("executable digest")
        if theirs != digest:
            raise RuntimeError("the parties compiled different SPU programs "
                               f"(model owner / data owner digests differ: {digest[:12]} vs {theirs[:12]})")
        self.executables[shape] = exe
        return exe

    def warm_up(self) -> int:
        """A product, a truncation and a comparison on two secret values; returns the runs."""
        import numpy as np
        import spu.libspu as libspu
        from spu.utils import frontend as fe

        def warm(a, b):
            return (a * b > 0.5) * a

        args = [np.ones(2, np.float32), np.ones(2, np.float32)]
        exe, _ = fe.compile(fe.Kind.JAX, warm, args, {}, ["wa", "wb"], [libspu.Visibility.VIS_SECRET] * 2,
                            lambda out: ["wout"])
        self.share_input("wa", args[0] if self.rank == 0 else None, owner=0)
        self.share_input("wb", args[1] if self.rank == 1 else None, owner=1)
        self.rt.run(exe)
        for name in ("wa", "wb", "wout"):
            self.rt.del_var(name)
        return 1

    # -- phases
    def setup(self) -> None:
        import numpy as np

        from backends.mpc.graph import plan_from_dict, plan_to_dict

        msg = recv(self.conn)
        assert msg[0] == "setup"
        hints = msg[3] if len(msg) > 3 else []      # batch shapes to compile ahead (data owner)
        agreed = {k: self.settings[k] for k in ("protocol", "field", "fxp_fraction_bits", "reveal_to")}
        if self.rank == 0:
            plan = plan_from_dict(msg[1])
            params = {k: unpack(v) for k, v in msg[2].items()}
            self.link.send_obj({"plan": plan_to_dict(plan), "settings": agreed})
            verdict = self.link.recv_obj("verdict")
        else:
            offer = self.link.recv_obj("architecture")
            verdict = "" if offer["settings"] == agreed else \
                f"model owner runs {offer['settings']}, data owner {agreed}"
            self.link.send_obj(verdict)
            plan, params = plan_from_dict(offer["plan"]), None
        if verdict:
            raise RuntimeError(f"the parties disagree on the protocol settings: {verdict}")
        self.plan = plan
        from backends.mpc.spu_jax import param_names

        for name in param_names(plan):
            value = np.asarray(params[name], dtype=np.float32) if self.rank == 0 else None
            self.share_input(name, value, owner=0)
        params = None
        # one-off work out of the online phase: compile the expected batch shape, and run a
        # tiny program so the protocol's own setup (Cheetah's OT and HE keys) happens now
        if self.rank == 1:
            self.link.send_obj(hints)
        else:
            hints = self.link.recv_obj("batch shapes")
        for shape in hints:
            self.executable(tuple(shape))
        runs = self.warm_up()
        self.report("ready", {"traffic": self.snapshot(runs=runs), "peak_rss": peak_rss_bytes()})
        self.reset_counts()

    def loop(self) -> None:
        import numpy as np

        n_batch = 0
        while True:
            images = None
            if self.rank == 1:
                msg = recv(self.conn)
                if msg[0] == "infer":
                    images = unpack(msg[1])
                    shape = list(images.shape)
                else:
                    shape = "stop"
                self.link.send_obj(shape)                  # tell the model owner: next batch / stop
            else:
                shape = self.link.recv_obj("batch shape")
            if shape == "stop":
                break
            shape = tuple(shape)
            start, cpu_start = time.perf_counter(), time.process_time()
            exe = self.executable(shape)
            x = None
            if self.rank == 1:        # the data owner's public, exact rescaling of its own pixels
                x = (images.astype(np.float64) * self.plan.input_scale).astype(np.float32)
            self.share_input("x", x, owner=1)
            self.rt.run(exe)
            mine = self.rt.get_var(exe.output_names[0])
            logits = None
            if self.rank == 0:
                self.send_share(mine)
                if self.settings["reveal_to"] == "both":
                    theirs = self.recv_share("output share")
                    logits = self._open(theirs, mine)
            else:
                theirs = self.recv_share("output share")
                if self.settings["reveal_to"] == "both":
                    self.send_share(mine)
                logits = self._open(theirs, mine)
            self.rt.del_var("x")
            self.rt.del_var(exe.output_names[0])
            local_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
            traffic = self.snapshot(runs=1)
            self.reset_counts()
            if self.link.record is not None:
                path = Path(self.settings["record_dir"]) / f"{self.role}_batch{n_batch}.pkl"
                path.write_bytes(pickle.dumps(self.link.record, protocol=4))
                self.link.record = []
            n_batch += 1
            self.report("result", {"logits": pack(logits) if logits is not None else None,
                                   "local_s": local_s, "cpu_s": cpu_s, "traffic": traffic,
                                   "peak_rss": peak_rss_bytes()})

    def _open(self, theirs: Any, mine: Any) -> Any:
        import numpy as np

        pair = [mine, theirs] if self.rank == 0 else [theirs, mine]
        return np.asarray(self.io.reconstruct(pair), dtype=np.float64)

    def close(self) -> None:
        try:
            self.link.ctx.stop_link()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    from multiprocessing.connection import Connection

    argv = sys.argv[1:] if argv is None else argv
    rank, fd = int(argv[0]), int(argv[1])
    conn = Connection(fd)
    parent = os.getppid()
    try:
        settings = recv(conn)
        watch_parent(parent)
        party = Party(rank, conn, settings)
        party.setup()
        party.loop()
        party.close()
    except BaseException:  # noqa: BLE001 - reported to the orchestrator, then exit non-zero
        try:
            send(conn, ("error", traceback.format_exc()))
        except Exception:
            pass
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
