"""Two-party secure inference with CrypTen: the whole DenseNet under MPC.

Parties (each its own OS process, children of the benchmark worker):
  party 0  model owner   holds the weights; secret-shares them (`crypten.cryptensor(w, src=0)`)
  party 1  data owner    holds the images; secret-shares them (`src=1`) and alone receives
                         the output logits (sigmoid applied by the receiver)
  party 2  dealer        only with `triples=ttp`: CrypTen's trusted third party, which
                         generates Beaver triples and sends party 0 its shares of them
This backend object, in the worker, is the orchestrator and the data owner's front end: it
hands party 1 the images over a local pipe (the hospital's own machine) and party 0 only the
batch shape, then receives the revealed outputs from party 1. The parties exchange nothing
but shares, through CrypTen's torch.distributed "gloo" transport.

The model owner folds BatchNorm and rewrites the network before sharing it
(`backends.mpc_plan`): every convolution, BN (folded), ReLU, pooling, concatenation and the
classifier run under MPC; only the architecture, the input shape and the outputs (to the
data owner) are revealed.

Options (`--backends mpc:KEY=VALUE:KEY=VALUE` or `[backends.mpc]` in the run config):
  batch_size      images per secure evaluation (default 8: batching amortises rounds and the
                  weights' openings; memory grows ~0.03 GB per image per party at 64 px,
                  ~0.4 GB at 224 px)
  max_images      stratified subset of the test set (default 64: about 0.15-0.5 s per image
                  on the default 64 px model with two parties on 2 shared cores, plus ~10-30 s
                  to start the parties; 0 = all)
  precision_bits  fixed-point fractional bits; 0 (default) = chosen by the model owner: it
                  runs the folded plan in plaintext on public synthetic images at the model's
                  resolution (mpc_plan.calibrate) and takes the most bits, at most 24, that
                  keep 2^8 headroom between the largest product's encoding (|y| * 2^(2p)) and
                  the 64-bit ring; the data owner learns only the number. The default model
                  gets 24, the untrained small DenseNet 21, a random DenseNet-121 19. The
                  ring is 64-bit whatever the precision, so fewer bits cost nothing less. On
                  the default model fidelity (max |dp| <= 1e-3) breaks at 13 bits and below
                  (exact truncation); the untrained small DenseNet on the NIH sample needs 20
                  (max |dp| 5.6e-4 at 20 bits, 2e-3 at 19, 1.2e-4 at its automatic 21)
  triples         "ttp": a third-party dealer process generates Beaver triples (default);
                  "tfp": CrypTen's trusted first party = party 0 (the model owner) generates
                  them: faster, but then the model owner holds the triples' randomness and is
                  TRUSTED not to use it (with it, the masked values it receives reveal the
                  image), so images are protected from it by trust, not cryptography
  pre_mode        "split" (default) or "mul": how the pre-activation BatchNorms are made
                  exact without (split) or with (mul) a secure multiplication; see mpc_plan
  relu            "packed" (default): backends.mpc_protocol's two-party ReLU (carry-only MSB
                  circuit with bit packing, bit conversion merged with the multiplication:
                  8 rounds, ~40% of the bytes); "crypten": CrypTen's own x * (x >= 0)
  truncation      "exact" (default): products are divided by 2^p with a two-party protocol that
                  cannot wrap (backends.mpc_protocol.TwoPartyGates.truncate: one carry circuit,
                  ~ the cost of a ReLU, per product value); "local": CrypTen's local share
                  division, free but wrong by ~2^(64-p) with probability |y| * 2^(2p-64) per
                  value - negligible on a trained model, about one failure per hundred images
                  on a model with uncalibrated BatchNorm (activations in the thousands)
  threads         torch threads per party (0 = half the run's threads, at least 1)
  reveal_to       "data_owner" (default) or "both"
  master_addr     rendezvous address (default $MPC_MASTER_ADDR or 127.0.0.1)
  master_port     rendezvous TCP port, hosted by party 0 (default $MPC_MASTER_PORT or a free
                  port). Across two machines, give the model owner's address and an open
                  port, and set GLOO_SOCKET_IFNAME to the interface the parties share.
  local_parties   "all" (default): the benchmark starts every party on this machine;
                  "data_owner": it starts only the data owner; the model owner (and, with
                  ttp, the dealer) run on other machines:
                    python -m backends.mpc_party model-owner --master-addr THIS_HOST \
                        --master-port P --checkpoint model.pt --labels L1,L2,... [--triples ...]
                    python -m backends.mpc_party dealer --master-addr MODEL_OWNER --master-port P
                  (same precision_bits / triples / relu / reveal_to on every side: the parties
                  check and refuse to start otherwise). Only the data owner's traffic and CPU
                  are measured then.
  timeout_s       longest wait for a party in one step (setup, one batch); a party that
                  exits or hangs ends the run with a clear error (default 900)
  engine          "crypten" (default, this module) or "spu": SecretFlow SPU parties in
                  .venv-spu/ (backends/mpc_spu.py), with its own options protocol
                  (semi2k | cheetah), field (FM64 | FM128), fxp_fraction_bits,
                  data_owner_addr and data_owner_port; they are rejected with engine=crypten

Traffic is counted inside each party (bytes sent / received, rounds = communication
calls) and reported per batch through the harness's meter; the triple dealer's traffic is
reported as its own party. Extra rows give each party's peak RSS and CPU time per image,
and the latency projected for a LAN and a WAN from the measured rounds, bytes and CPU time.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.party_process import ROOT, recv, send, start_party
from suite.backend import Backend, BackendContext, BackendOptions
from suite.errors import SuiteError
from suite.threat_model import ThreatModel

ROLE_NAMES = {0: "model owner (party 0)", 1: "data owner (party 1)", 2: "triple dealer (party 2)"}
METER_PARTY = {0: "model_owner", 1: "data_owner", 2: "dealer"}
#: network models for the projected-latency rows: (name, bandwidth bit/s, round-trip s)
NETWORKS = (("lan", 1e9, 0.5e-3), ("wan", 100e6, 40e-3))


class MPCPartyError(RuntimeError):
    """A party failed, exited or stopped answering: the secure computation cannot go on."""


@dataclass
class MPCOptions(BackendOptions):
    batch_size: int = 8
    max_images: int = 64
    precision_bits: int = 0            # 0 = chosen by the model owner from calibration
    triples: str = "ttp"
    pre_mode: str = "split"
    relu: str = "packed"
    truncation: str = "exact"
    threads: int = 0
    reveal_to: str = "data_owner"
    master_addr: str = ""
    master_port: int = 0
    local_parties: str = "all"
    timeout_s: float = 900.0
    # engine=spu (backends/mpc_spu.py): SecretFlow SPU parties in .venv-spu/
    engine: str = "crypten"
    protocol: str = ""                 # spu: semi2k (default) | cheetah; crypten: must stay ""
    field: str = ""                    # spu: FM64 (default) | FM128
    fxp_fraction_bits: int = 0         # spu: fixed-point fractional bits (0 = SPU's default)
    data_owner_addr: str = ""          # spu: the data owner's link address (default master_addr)
    data_owner_port: int = 0           # spu: its link port (default: a free one)


class MPCBackend(Backend):
    name = "mpc"
    track = "inference"
    extra = "mpc"
    requires = ("crypten", "omegaconf", "yaml")
    Options = MPCOptions
    tolerance = 1e-3
    default_batch_size = 8
    test_options = {"max_images": 4, "batch_size": 4, "timeout_s": 300}

    @classmethod
    def implementation(cls, options: BackendOptions) -> type[Backend]:
        engine = getattr(options, "engine", "crypten")
        if engine == "crypten":
            return MPCBackend
        if engine == "spu":
            from backends.mpc_spu import SPUBackend

            return SPUBackend
        raise SuiteError(f"mpc option engine must be 'crypten' or 'spu', got '{engine}'")

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        self._procs: dict[int, subprocess.Popen] = {}
        self._conns: dict[int, Any] = {}
        self._batches: list[dict[str, Any]] = []
        self._peak_rss: dict[int, int] = {}
        self._step = "setup"
        self._local: tuple[int, ...] = (0, 1)
        self._validate()

    # ------------------------------------------------------------------ description

    def _validate(self) -> None:
        o = self.options
        if o.triples not in ("tfp", "ttp"):
            raise SuiteError(f"mpc option triples must be 'tfp' or 'ttp', got '{o.triples}'")
        if o.reveal_to not in ("data_owner", "both"):
            raise SuiteError(f"mpc option reveal_to must be 'data_owner' or 'both', got '{o.reveal_to}'")
        if o.pre_mode not in ("split", "mul"):
            raise SuiteError(f"mpc option pre_mode must be 'split' or 'mul', got '{o.pre_mode}'")
        if o.relu not in ("packed", "crypten"):
            raise SuiteError(f"mpc option relu must be 'packed' or 'crypten', got '{o.relu}'")
        if o.truncation not in ("exact", "local"):
            raise SuiteError(f"mpc option truncation must be 'exact' or 'local', got '{o.truncation}'")
        if o.local_parties not in ("all", "data_owner"):
            raise SuiteError(f"mpc option local_parties must be 'all' or 'data_owner', got '{o.local_parties}'")
        if o.precision_bits and not 4 <= o.precision_bits <= 30:
            raise SuiteError(f"mpc option precision_bits must be 0 (automatic) or in [4, 30], "
                             f"got {o.precision_bits}")
        spu_only = [k for k in ("protocol", "field", "fxp_fraction_bits", "data_owner_addr", "data_owner_port")
                    if getattr(o, k)]
        if spu_only:
            raise SuiteError(f"mpc option(s) {', '.join(spu_only)} apply to engine=spu only")

    def threat_model(self) -> ThreatModel:
        o = self.options
        parties = ["model owner (party 0: holds the weights)", "data owner (party 1: holds the images)"]
        if o.triples == "ttp":
            parties.append("triple dealer (party 2: generates Beaver triples, sees no data)")
            triples = ("a third-party dealer generates the Beaver triples and does not collude "
                       "with either party")
            protection = "input images from the model owner, model weights from the data owner"
        else:
            triples = ("TRUSTED FIRST PARTY: the model owner (party 0) generates all Beaver "
                       "triples; it holds their randomness and is trusted to discard it - a model "
                       "owner that keeps it can unmask the values it receives, including the image")
            protection = ("model weights from the data owner (cryptographic); input images from "
                          "the model owner only by the trusted-first-party assumption")
        return ThreatModel(
            protects=("input_images", "model_weights"),
            from_whom="the other party: images from the model owner, weights from the data owner",
            adversary="semi-honest (honest-but-curious) parties that do not collude",
            parties=tuple(parties),
            trust_assumptions=(
                triples,
                "parties follow the protocol (semi-honest); no active-security checks",
                ("both parties run on hosts they control; the benchmark starts them on one machine, "
                 "where the worker holds model and images only to hand each party its own input")
                if o.local_parties == "all" else
                ("each party runs on its own host; this benchmark runs the data owner, the model "
                 "owner runs its own program with its own checkpoint"),
            ),
            guarantee_kind="cryptographic",
            guarantee=(f"2-party additive secret sharing over Z_2^64 (CrypTen {self._crypten_version()}), "
                       f"fixed point with {self._precision_text()}; protects {protection}"),
            leaks=self._leaks(),
            protected_scope="entire DenseNet (all convolutions, BN (folded), ReLU, pooling, "
                            "concatenation, classifier)",
            simulated=False,
            notes=(f"BatchNorm folded by the model owner (pre-activation BN: {o.pre_mode}); ReLU "
                   f"protocol: {o.relu}; "
                   + ("all parties on one host over loopback; " if o.local_parties == "all" else "")
                   + "WAN/LAN latency rows are projections; "
                   + ("fixed-point products are truncated exactly (wrap bit from a carry circuit, "
                      "error at most one least significant bit)" if o.truncation == "exact" else
                      "fixed-point truncation is CrypTen's local one, which fails (a large error) "
                      "with probability ~|x| * 2^(2p-64) per product")),
        )

    def _leaks(self) -> tuple[str, ...]:
        """What two-party inference reveals, whatever the engine."""
        return ("the model architecture (layer shapes) to the data owner",
                "the input shape and batch size to the model owner",
                "the output scores to the data owner" if self.options.reveal_to == "data_owner"
                else "the output scores to both parties",
                "timing and traffic volume (fixed by the architecture)")

    def _precision_text(self) -> str:
        chosen = getattr(self, "_precision", 0)
        if self.options.precision_bits or chosen:
            return f"{self.options.precision_bits or chosen} fractional bits"
        return "fractional bits chosen by the model owner from calibration (row fixed_point_precision_bits)"

    @staticmethod
    def _crypten_version() -> str:
        try:
            from importlib.metadata import version

            return version("crypten")
        except Exception:
            return "0.4.1"

    def versions(self) -> dict[str, str]:
        import torch

        return {"crypten": self._crypten_version(), "torch": torch.__version__}

    # ------------------------------------------------------------------ lifecycle

    def setup(self, ctx: BackendContext) -> None:
        from backends.mpc_plan import build_plan, model_owner_precision

        o = self.options
        self._meter = ctx.meter
        self._n_labels = len(ctx.model.pathologies)
        self._resolution = getattr(ctx.model.net, "input_resolution", None)
        plan, params = build_plan(ctx.model.net, o.pre_mode)
        self._n_params = plan.n_params()
        if o.local_parties == "all":     # this worker plays the model owner too
            try:
                self._calibration, self._precision = model_owner_precision(
                    plan, params, ctx.model.resolution, o.precision_bits, o.truncation)
            except ValueError as exc:
                raise SuiteError(f"mpc: {exc}") from None
        else:                             # the remote model owner chooses; 0 adopts its choice
            self._calibration, self._precision = None, o.precision_bits
        addr = o.master_addr or os.environ.get("MPC_MASTER_ADDR") or "127.0.0.1"
        port = int(o.master_port or os.environ.get("MPC_MASTER_PORT") or _free_port(addr))
        threads = o.threads or max(1, int(ctx.threads) // 2)
        settings = {
            "master_addr": addr, "master_port": port, "threads": threads,
            "triples": o.triples, "precision_bits": self._precision, "reveal_to": o.reveal_to,
            "timeout_s": o.timeout_s, "record_dir": os.environ.get("MPC_RECORD_DIR") or None,
            "profile": os.environ.get("MPC_PROFILE") == "1", "relu": o.relu,
            "truncation": o.truncation,
        }
        if o.local_parties == "all":
            ranks = (2, 0, 1) if o.triples == "ttp" else (0, 1)
        else:                              # model owner (and dealer) run elsewhere
            ranks = (1,)
        self._local = tuple(r for r in ranks if r != 2)
        for rank in ranks:
            self._procs[rank], self._conns[rank] = _start_party(rank, settings, threads)
        # the model owner gets its own (folded) model; the data owner gets nothing but the
        # architecture, which party 0 sends it over the MPC channel
        if 0 in self._procs:
            self._send(0, ("setup", plan, params), "setup (sharing the model)")
        self._send(1, ("setup", None, None), "setup (sharing the model)")
        replies = self._wait("setup (sharing the model)")
        for rank, reply in replies.items():
            self._record(rank, reply, phase="setup")

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        self._step = f"batch {len(self._batches) + 1}"
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self._resolution and x.shape[-1] != self._resolution:
            import torchxrayvision as xrv  # data owner's own plaintext preprocessing

            x = xrv.utils.fix_resolution(x, self._resolution, None)
        shape = tuple(x.shape)
        step = f"secure inference, {self._step} ({shape[0]} images)"
        # only the data owner is told; it announces the batch shape to the model owner
        self._send(1, ("infer", shape, x), step)
        replies = self._wait(step)
        for rank, reply in replies.items():
            self._record(rank, reply, phase=None)
        logits = replies[1]["logits"]
        if logits is None or tuple(logits.shape) != (shape[0], self._n_labels):
            raise MPCPartyError(f"data owner received no logits of shape {(shape[0], self._n_labels)}")
        self._batches.append({"n": shape[0], "local_s": replies[1]["local_s"],
                              "cpu_s": {r: replies[r]["cpu_s"] for r in replies},
                              "profile": replies[1].get("profile"),
                              "traffic": {r: replies[r]["traffic"] for r in replies}})
        self.last_logits = logits          # diagnostics: the revealed logits, before sigmoid
        return torch.sigmoid(logits.double()).numpy()

    def teardown(self) -> None:
        # the data owner tells the model owner to stop; party 0 then stops the dealer
        if 1 in self._procs and self._procs[1].poll() is None:
            try:
                send(self._conns[1], ("stop",))
            except Exception:
                pass
        deadline = time.monotonic() + 15
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
                raise MPCPartyError(_failure_message(step, self._dead(), errors))
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
            raise MPCPartyError(_failure_message(step, self._dead(), {})) from None

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

    # ------------------------------------------------------------------ extra figures

    def _precision_rows(self) -> list[dict]:
        cal = getattr(self, "_calibration", None)
        if cal is None:
            return []
        how = ("set by the precision_bits option" if self.options.precision_bits else
               "chosen by the model owner: the most bits (at most 24) that leave 2^8 headroom above the "
               "largest product on its calibration images" if self.options.truncation == "exact" else
               "CrypTen's default for local truncation")
        source = f"{cal.images} public synthetic calibration images at the model's resolution"
        rows = [{"metric": "fixed_point_precision_bits", "value": self._precision, "unit": "bits",
                 "higher_is_better": True, "note": f"fractional bits of the fixed-point encoding, {how}"},
                {"metric": "fixed_point_headroom_bits", "value": cal.headroom_bits(self._precision),
                 "unit": "bits", "higher_is_better": True,
                 "note": f"log2(2^63 / (largest product * 2^(2p))) on {source}: how much larger the data "
                         f"owner's activations may be before the ring overflows"}]
        if self.options.truncation == "local":
            rows.append({"metric": "expected_truncation_failures_per_image",
                         "value": cal.local_failures_per_image(self._precision), "unit": "",
                         "higher_is_better": False,
                         "note": f"sum over products of |y| * 2^(2p-64) on {source}: each failure "
                                 f"corrupts one value by ~2^(64-p) (local truncation)"})
        return rows


    _ROUNDS_TERM = "R = rounds (communication calls) per batch"

    def _batch_rounds(self, batch: dict, local: list[int]) -> int:
        """Rounds of one batch charged in the projections: the busier party's."""
        return max(batch["traffic"][r]["rounds"] for r in local)

    def extra_rows(self) -> list[dict]:
        rows = self._precision_rows() + [{"metric": "party_peak_rss", "value": rss, "unit": "bytes", "higher_is_better": False,
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
                "metric": f"projected_latency_per_image_{name}", "value": value, "unit": "s",
                "higher_is_better": False, "phase": "online",
                "note": (f"projected from measured rounds and bytes plus measured compute: "
                         f"sum over batches of (T_cpu + (R + R_dealer) * RTT + (B + B_dealer) * 8 / bandwidth), "
                         f"divided by the images; RTT {rtt * 1e3:g} ms, bandwidth {bandwidth / 1e6:g} Mbit/s; "
                         f"T_cpu = CPU time of the busier party (single-threaded parties on their own "
                         f"hosts); {self._ROUNDS_TERM}; B = bytes sent by the "
                         f"busier party (links full duplex); dealer terms only with triples=ttp; "
                         f"ignores overlap of compute and transfer (conservative)"),
            })
        return rows


def _start_party(rank: int, settings: dict[str, Any], threads: int):
    """Start party `rank` as `python -m backends.mpc_party`, talking over a socketpair."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return start_party(sys.executable, "backends.mpc_party", rank, env, settings)


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr if addr not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def _failure_message(step: str, dead: dict[int, int | None], errors: dict[int, str]) -> str:
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
