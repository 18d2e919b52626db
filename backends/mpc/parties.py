"""Party orchestration shared by both MPC engines (CrypTen, SPU).

The worker starts each party as its own process, talks to it over a pipe, and waits for
all parties' replies to one step at a time; a party that errs, exits or hangs ends the step
with a message that names the first cause. Traffic is recorded per party in the harness's
meter, and the per-image projections (LAN/WAN) are computed here from what was measured.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from typing import Any

from backends.mpc.options import MPCOptions
from backends.mpc.party_process import recv, send
from suite.backend import Backend, BackendOptions
from suite.errors import SuiteError

ROLE_NAMES = {0: "model owner (party 0)", 1: "data owner (party 1)", 2: "triple dealer (party 2)"}
METER_PARTY = {0: "model_owner", 1: "data_owner", 2: "dealer"}
#: network models for the projected-latency rows: (name, bandwidth bit/s, round-trip s)
NETWORKS = (("lan", 1e9, 0.5e-3), ("wan", 100e6, 40e-3))
#: what carries the party links across hosts (MPCOptions.channel)
CHANNELS = ("plain", "tls-vpn")


class MPCPartyError(RuntimeError):
    """A party failed, exited or stopped answering: the secure computation cannot go on."""



class PartyBackend(Backend):
    """What every `mpc` engine shares: its row identity, party processes and accounting."""

    name = "mpc"
    track = "inference"
    extra = "mpc"
    Options = MPCOptions
    tolerance = 1e-3
    default_batch_size = 8
    test_options = {"max_images": 4, "batch_size": 4, "timeout_s": 300}

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        self._procs: dict[int, subprocess.Popen] = {}
        self._conns: dict[int, Any] = {}
        self._batches: list[dict[str, Any]] = []
        self._peak_rss: dict[int, int] = {}
        self._step = "setup"
        self._local: tuple[int, ...] = (0, 1)
        self._validate()
        self._validate_channel()

    def _validate_channel(self) -> None:
        o = self.options
        if o.channel not in CHANNELS:
            raise SuiteError(f"mpc option channel must be one of {', '.join(CHANNELS)}, got '{o.channel}'")
        if o.channel == "tls-vpn" and o.local_parties == "all":
            raise SuiteError("mpc option channel=tls-vpn is for parties on other hosts "
                             "(local_parties=data_owner); all-local parties talk over loopback")

    def _validate(self) -> None:
        """Engine-specific option checks (each engine overrides this)."""

    def _model_owner_plan(self, ctx: Any) -> tuple[Any, dict]:
        """What every engine does first at setup: keep the meter and the output shape, and
        fold the model into the shared plan (`backends.mpc.plan`)."""
        from backends.mpc.plan import build_plan

        self._meter = ctx.meter
        self._n_labels = len(ctx.model.pathologies)
        self._resolution = getattr(ctx.model.net, "input_resolution", None)
        plan, params = build_plan(ctx.model.net, self.options.pre_mode)
        self._n_params = plan.n_params()
        return plan, params

    def _master_address(self) -> tuple[str, int]:
        """The model owner's rendezvous: the options, else MPC_MASTER_ADDR/PORT, else loopback."""
        o = self.options
        addr = o.master_addr or os.environ.get("MPC_MASTER_ADDR") or "127.0.0.1"
        if o.channel == "tls-vpn":
            check_tunnel_route(addr)
        return addr, int(o.master_port or os.environ.get("MPC_MASTER_PORT") or free_port(addr))

    def _channel_text(self) -> str:
        return channel_text(self.options)

    def _leaks(self) -> tuple[str, ...]:
        """What two-party inference reveals, whatever the engine."""
        return ("the model architecture (layer shapes) to the data owner",
                "the input shape and batch size to the model owner",
                "the output scores to the data owner" if self.options.reveal_to == "data_owner"
                else "the output scores to both parties",
                "timing and traffic volume (fixed by the architecture)")

    def teardown(self) -> None:
        # the data owner tells the model owner to stop; party 0 then stops the dealer
        if 1 in self._procs and self._procs[1].poll() is None:
            try:
                send(self._conns[1], ("stop",))
            except Exception:
                pass
        # a party already gone: the others are stuck waiting for it, stop them at once
        deadline = time.monotonic() + (1 if self._dead() else 15)
        for rank in (0, 1, 2):            # party 0 stops the dealer at its shutdown
            proc = self._procs.get(rank)
            if proc is not None:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
        for conn in self._conns.values():
            conn.close()
        self._procs.clear()
        self._conns.clear()

    # ------------------------------------------------------------------ orchestration

    def _wait(self, step: str) -> dict[int, dict]:
        """Both parties' replies for `step`; a party that errs, exits or hangs raises."""
        timeout = float(self.options.timeout_s)
        deadline = time.monotonic() + timeout
        pending, replies, errors = set(self._local), {}, {}
        while pending:
            closed = False
            for rank in sorted(pending):
                conn = self._conns[rank]
                try:
                    msg = recv(conn) if conn.poll(0.05) else None
                except (EOFError, OSError):          # the party is gone: see its exit code
                    closed = True
                    try:
                        self._procs[rank].wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                if msg is None:
                    continue
                if msg[0] == "error":
                    errors[rank] = msg[1]
                else:
                    replies[rank] = msg[1]
                pending.discard(rank)
            dead = self._dead()
            if errors or dead or closed:
                time.sleep(0.5)        # let the other side notice, so the first cause is named
                for rank in self._dead():
                    errors.setdefault(rank, None)
                    try:
                        if self._conns[rank].poll(0):
                            msg = recv(self._conns[rank])
                            errors[rank] = msg[1] if msg[0] == "error" else None
                    except (EOFError, OSError):
                        pass
                    if errors[rank] is None:
                        del errors[rank]
                raise MPCPartyError(failure_message(step, self._dead(), errors))
            if time.monotonic() > deadline:
                who = ", ".join(ROLE_NAMES[r] for r in sorted(pending))
                raise MPCPartyError(f"MPC {step}: no answer from {who} within timeout_s={timeout:.0f} s")
        return replies

    def _send(self, rank: int, msg: tuple, step: str) -> None:
        try:
            send(self._conns[rank], msg)
        except OSError:                     # broken pipe: the party is gone
            try:
                self._procs[rank].wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            raise MPCPartyError(failure_message(step, self._dead(), {})) from None

    def _dead(self) -> dict[int, int | None]:
        return {r: p.returncode for r, p in self._procs.items() if p.poll() is not None}

    def _record(self, rank: int, reply: dict, phase: str | None) -> None:
        t = reply["traffic"]
        self._meter.record(METER_PARTY[rank], sent=t["sent"], received=t["received"],
                           rounds=t["rounds"], messages=t["rounds"], phase=phase)
        if rank == 0 and (t["dealer_sent"] or t["dealer_received"]):
            # seen from the dealer: it sends party 0 its triple shares, receives requests
            self._meter.record(METER_PARTY[2], sent=t["dealer_received"], received=t["dealer_sent"],
                               rounds=t["dealer_rounds"], messages=t["dealer_rounds"], phase=phase)
        self._peak_rss[rank] = max(self._peak_rss.get(rank, 0), int(reply.get("peak_rss", 0)))

    _ROUNDS_TERM = "R = rounds (communication calls) per batch"

    def _batch_rounds(self, batch: dict, local: list[int]) -> int:
        """Rounds of one batch charged in the projections: the busier party's."""
        return max(batch["traffic"][r]["rounds"] for r in local)

    def extra_rows(self) -> list[dict]:
        rows = [{"metric": "channel_encrypted", "value": float(self.options.channel == "tls-vpn"),
                 "unit": "", "higher_is_better": True, "note": self._channel_text()}]
        rows += [{"metric": "party_peak_rss", "value": rss, "unit": "bytes", "higher_is_better": False,
                 "party": METER_PARTY[rank],
                 "note": "peak resident memory (VmHWM) of the party's own process"}
                for rank, rss in sorted(self._peak_rss.items())]
        n = sum(b["n"] for b in self._batches)
        if not n:
            return rows
        local = sorted(self._batches[0]["cpu_s"])
        for rank in local:
            rows.append({"metric": "party_cpu_time_per_image", "unit": "s", "higher_is_better": False,
                         "value": sum(b["cpu_s"][rank] for b in self._batches) / n,
                         "party": METER_PARTY[rank], "phase": "online",
                         "note": "CPU seconds the party process spent in the secure computation, per image"})
        compute = sum(max(b["cpu_s"].values()) for b in self._batches)
        # (with local_parties=data_owner only the data owner's side is measured here)
        rounds = sum(self._batch_rounds(b, local) for b in self._batches)
        peak_bytes = sum(max(max(b["traffic"][r]["sent"], b["traffic"][r]["received"]) for r in local)
                         for b in self._batches)     # max(sent, received): exact with one party
        d_rounds = sum(b["traffic"].get(0, {}).get("dealer_rounds", 0) for b in self._batches)
        d_bytes = sum(b["traffic"].get(0, {}).get("dealer_received", 0)
                      + b["traffic"].get(0, {}).get("dealer_sent", 0) for b in self._batches)
        for name, bandwidth, rtt in NETWORKS:
            value = (compute + (rounds + d_rounds) * rtt + (peak_bytes + d_bytes) * 8 / bandwidth) / n
            rows.append({
                "metric": "projected_latency_per_image", "value": value, "unit": "s",
                "higher_is_better": False, "phase": "online", "network": name, "estimate": "projected",
                "note": (f"projected from measured rounds and bytes plus measured compute: "
                         f"sum over batches of (T_cpu + (R + R_dealer) * RTT + (B + B_dealer) * 8 / bandwidth), "
                         f"divided by the images; RTT {rtt * 1e3:g} ms, bandwidth {bandwidth / 1e6:g} Mbit/s; "
                         f"T_cpu = CPU time of the busier party (single-threaded parties on their own "
                         f"hosts); {self._ROUNDS_TERM}; B = bytes sent by the "
                         f"busier party (links full duplex); dealer terms only with triples=ttp; "
                         f"ignores overlap of compute and transfer (conservative)"),
            })
        return rows


def channel_text(options: MPCOptions) -> str:
    """What protected the party links: the threat model's channel line and the
    channel_encrypted row's note."""
    if options.local_parties == "all":
        return ("channels: loopback on one host (plain TCP through the parties' transport, "
                "which has no TLS; nothing leaves the machine)")
    if options.channel == "tls-vpn":
        return ("channels: ENCRYPTED between hosts: every pair of hosts (dealer included) linked by its "
                "own OpenVPN tunnel started by the suite (backends.mpc.tunnel: TLS 1.3, both ends "
                "authenticated by per-run Ed25519 certificates, data channel AES-256-GCM); the "
                "rendezvous route was checked to run through a tun device; an observer of the network "
                "sees packet sizes and timing only")
    return ("channels: PLAIN TCP between hosts (the parties' transport has no TLS and no tunnel was "
            "used, channel=plain): anyone who can watch the links reads the dealer's keys, the triple "
            "shares and the openings, hence both inputs; use channel=tls-vpn (backends.mpc.tunnel)")


def check_tunnel_route(addr: str) -> None:
    """channel=tls-vpn: the rendezvous must be reached through a tunnel, or the label lies."""
    from backends.mpc.tunnel import is_tunnel_device, route_device

    dev = route_device(addr)
    if dev is None or not is_tunnel_device(dev):
        raise SuiteError(f"mpc channel=tls-vpn: the rendezvous address {addr} is reached via "
                         f"{dev or 'no route'}, not a tunnel; start `python -m backends.mpc.tunnel host ...` "
                         f"on every host and give the model owner's tunnel address")


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr if addr not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def failure_message(step: str, dead: dict[int, int | None], errors: dict[int, str]) -> str:
    """Name the first cause (a party that exited) before the consequences (the peers' errors)."""
    parts = []
    for rank, code in sorted(dead.items()):
        if rank not in errors:
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            parts.append(f"{ROLE_NAMES[rank]} exited ({how})")
    for rank, tb in sorted(errors.items()):
        last = [line for line in str(tb).strip().splitlines() if line.strip()]
        text = last[-1] if last else str(tb)
        text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text).split(". This is typically")[0]
        verb = "then failed" if parts else "failed"
        parts.append(f"{ROLE_NAMES[rank]} {verb}: {text[:300]}")
    if not parts:
        parts.append("a party closed its pipe")
    return f"MPC {step} aborted: " + "; ".join(parts) + "; the secure computation cannot continue"
