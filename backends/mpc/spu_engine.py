"""Two-party secure inference with SecretFlow SPU: `mpc:engine=spu:protocol=semi2k|cheetah`.

The second engine of the `mpc` backend (`backends.mpc.MPCBackend.implementation` picks this
class from the options). The same plan as the CrypTen engine (`backends.mpc.plan.build_plan`:
BatchNorm folded, the same poolings) reaches SPU as a JAX function traced from
`backends.mpc.graph.run_plan` (`backends.mpc.spu_jax`), and runs under one of SPU's two-party
protocols:

  semi2k   additive secret sharing over Z_2^k with Beaver triples. SPU 0.9.5 ships only the
           trusted-first-party triple source (`BeaverTfpUnsafe`): party 0, the model owner,
           generates every triple's randomness, so the images are protected from it by TRUST
           (like CrypTen's triples=tfp), not by cryptography. Its beaver_type may also be
           TrustedThirdParty, but that is only a client (BeaverTtp) needing the host of SPU's
           beaver TTP server, which the 0.9.5 wheel does not ship (unimplemented service
           stubs; building it needs SPU's bazel tree), and MultiParty is refused ("unsupported
           beaver type 2"): tests/test_mpc_spu_beaver.py pins this, so no dealer is offered.
  cheetah  dealer-free: products by lattice HE (silent OT for the nonlinear parts); neither
           party holds the other's randomness. Several times slower: random DenseNet-121 at
           112 px, batch 1, one NIH image (2026-12-02, 2 cores UNDER HEAVY LOAD, load average
           15-25): 2110 s, 835 MB, party CPU 568 / 510 s, party peak RSS 3.5 / 3.2 GB; at 224 and
           160 px the parties outgrew the memory left on the shared machine (tree RSS 14.7 GB
           at 224 px after 21 min) and were stopped by a watchdog.

SPU 0.9.5 needs numpy<2 and jax<=0.4.34, so its parties run from their own virtual
environment, `.venv-spu/` (created by scripts/setup.sh), as separate processes
(`backends.mpc.spu_party`); this object, in the benchmark worker, only hands the model owner
its folded model and the data owner its images, and reads back outputs and statistics. The
parties talk over SPU's brpc link, each listening on its own host:port.

Across hosts (`local_parties=data_owner`): this worker starts only the data owner; the model
owner runs `python -m backends.mpc.spu_engine model-owner --listen ADDR:PORT --data-owner
ADDR:PORT --checkpoint M --labels ...` on its own host (it folds its checkpoint with torch and
starts party 0 from its `.venv-spu/`). The data owner then needs master_port (or
$MPC_MASTER_PORT), data_owner_addr and data_owner_port, the same addresses as the model
owner's flags. With `channel=tls-vpn` both are addresses inside the suite's OpenVPN tunnels
(backends.mpc.tunnel), which carry brpc's TCP unchanged; every row's channel line says
which the link had (`_channel_text`). scripts/mpc_two_namespaces.sh --engine spu shows it.

SPU options (the rest as for CrypTen: batch_size, max_images, pre_mode, reveal_to,
master_addr / master_port (the model owner's link address), local_parties, channel, timeout_s):
  protocol           semi2k (default) | cheetah
  field              FM64 (default) | FM128: the ring; FM128 doubles every share's bytes
  fxp_fraction_bits  fixed-point fractional bits (0: SPU's default, 18 for FM64, 26 for FM128)
                     FM64's 18 bits hold the fidelity bar on trained models (max |dp| 1.5e-4)
                     but not on the untrained small DenseNet (NIH sample, 64 px: 3.4e-3);
                     FM128 does (5.6e-6) for ~1.2x the time and 1.9x the bytes
  data_owner_addr    the data owner's link address (default: master_addr; required with
                     local_parties=data_owner)
  data_owner_port    its port (default: a free one; required with local_parties=data_owner)
SPU's link statistics count bytes and *messages* (send actions), not rounds: the online
traffic rows report messages, the rounds rows are absent, and the projected LAN/WAN
latencies charge one round trip per message of the busier party (an upper bound on rounds).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from backends.mpc.parties import METER_PARTY, MPCPartyError, PartyBackend, free_port
from backends.mpc.party_process import ROOT, start_party
from suite.backend import BackendContext, BackendOptions, BatchMeta
from suite.errors import BackendUnavailable, SuiteError
from suite.threat_model import ThreatModel

SPU_VERSION = "0.9.5"
PROTOCOLS = ("semi2k", "cheetah")
FIELDS = {"FM64": 18, "FM128": 26}      # field -> SPU's default fxp_fraction_bits


def spu_venv() -> Path:
    """SPU's own environment: .venv-spu/ at the repo root ($SPU_VENV overrides)."""
    return Path(os.environ.get("SPU_VENV") or ROOT / ".venv-spu")


def spu_python() -> Path:
    return spu_venv() / "bin" / "python"


def spu_available() -> bool:
    """Created and completely installed by scripts/setup.sh (its stamp file is written last)."""
    return spu_python().exists() and (spu_venv() / ".spu-installed").exists()


class SPUBackend(PartyBackend):
    """`mpc` with engine=spu: SecretFlow SPU parties in `.venv-spu/`."""

    def __init__(self, options: BackendOptions | None = None) -> None:
        o = options if options is not None else self.Options()
        # normalise, so `mpc:engine=spu` and `mpc:engine=spu:protocol=semi2k` are one row
        o = dataclasses.replace(o, protocol=o.protocol or "semi2k", field=o.field.upper())
        super().__init__(o)
        if not spu_available():
            raise BackendUnavailable(
                f"mpc engine=spu needs SecretFlow SPU {SPU_VERSION} in its own environment "
                f"{spu_venv()}/, which is missing: create it with `bash scripts/setup.sh` "
                f"(needs /usr/bin/python3.11)")

    def _validate(self) -> None:
        o = self.options
        if o.protocol not in PROTOCOLS:
            raise SuiteError(f"mpc option protocol must be one of {', '.join(PROTOCOLS)} with engine=spu, "
                             f"got '{o.protocol}'")
        if o.field and o.field not in FIELDS:
            raise SuiteError(f"mpc option field must be FM64 or FM128, got '{o.field}'")
        bits = o.fxp_fraction_bits
        limit = 128 if o.field == "FM128" else 64
        if bits and not 4 <= bits <= limit // 2 - 2:
            raise SuiteError(f"mpc option fxp_fraction_bits must be 0 (SPU's default) or in "
                             f"[4, {limit // 2 - 2}] for {o.field}, got {bits}")
        if o.rng != "csprng":
            raise SuiteError("mpc option rng applies to engine=crypten only (SPU draws its own randomness)")
        if o.reveal_to not in ("data_owner", "both"):
            raise SuiteError(f"mpc option reveal_to must be 'data_owner' or 'both', got '{o.reveal_to}'")
        if o.pre_mode not in ("split", "mul"):
            raise SuiteError(f"mpc option pre_mode must be 'split' or 'mul', got '{o.pre_mode}'")
        if o.local_parties not in ("all", "data_owner"):
            raise SuiteError(f"mpc option local_parties must be 'all' or 'data_owner', got '{o.local_parties}'")
        if o.local_parties == "data_owner":
            # the model owner's party, on its own host, must be told where to reach ours
            missing = [k for k in ("data_owner_addr", "data_owner_port") if not getattr(o, k)]
            if not (o.master_port or os.environ.get("MPC_MASTER_PORT")):
                missing.append("master_port")
            if missing:
                raise SuiteError(f"mpc engine=spu with local_parties=data_owner needs {', '.join(missing)}: "
                                 f"the address the model owner's link listens on and the one it reaches "
                                 f"this data owner at (the same values as its --listen / --data-owner)")
        defaults = type(o)()
        crypten_only = [k for k in ("precision_bits", "triples", "relu", "truncation", "threads")
                        if hasattr(o, k) and getattr(o, k) != getattr(defaults, k)]
        if crypten_only:
            raise SuiteError(f"mpc option(s) {', '.join(crypten_only)} apply to engine=crypten only; "
                             f"engine=spu takes protocol, field and fxp_fraction_bits")

    def fraction_bits(self) -> int:
        return self.options.fxp_fraction_bits or FIELDS[self.field]

    @property
    def field(self) -> str:
        return self.options.field or "FM64"

    # ------------------------------------------------------------------ description

    def threat_model(self) -> ThreatModel:
        o = self.options
        ring = f"Z_2^{64 if self.field == 'FM64' else 128}"
        if o.protocol == "semi2k":
            material = ("TRUSTED FIRST PARTY: SPU 0.9.5's SEMI2K takes its Beaver triples from party 0 "
                        "(the model owner, BeaverTfpUnsafe), which knows all of their randomness and is "
                        "trusted to discard it - a model owner that keeps it can unmask the values it "
                        "receives, including the image")
            protection = ("model weights from the data owner (cryptographic); input images from the model "
                          "owner only by the trusted-first-party assumption")
            guarantee = (f"2-party additive secret sharing over {ring} (SPU {SPU_VERSION} SEMI2K), fixed "
                         f"point with {self.fraction_bits()} fractional bits; protects {protection}")
        else:
            material = ("no dealer and no trusted party: Cheetah generates its correlations between the "
                        "two parties (lattice HE for products, silent OT for comparisons and truncations)")
            protection = "input images from the model owner and model weights from the data owner"
            guarantee = (f"2-party additive secret sharing over {ring} with Cheetah's HE/OT protocols "
                         f"(SPU {SPU_VERSION} CHEETAH), fixed point with {self.fraction_bits()} fractional "
                         f"bits; protects {protection} (cryptographic, under LWE and OT assumptions)")
        return ThreatModel(
            protects=("input_images", "model_weights"),
            from_whom="the other party: images from the model owner, weights from the data owner",
            adversary="semi-honest (honest-but-curious) parties that do not collude",
            parties=("model owner (party 0: holds the weights)", "data owner (party 1: holds the images)"),
            trust_assumptions=(
                material,
                "parties follow the protocol (semi-honest); no active-security checks",
                ("both parties run on hosts they control; the benchmark starts them on one machine, where "
                 "the worker holds model and images only to hand each party its own input")
                if o.local_parties == "all" else
                ("each party runs on its own host; this benchmark runs the data owner, the model owner "
                 "runs its own program with its own checkpoint (python -m backends.mpc.spu_engine "
                 "model-owner)"),
                self._channel_text(),
            ),
            guarantee_kind="cryptographic",
            guarantee=guarantee,
            leaks=self._leaks(),
            protected_scope="entire DenseNet (all convolutions, BN (folded), ReLU, pooling, "
                            "concatenation, classifier)",
            simulated=False,
            notes=(f"SecretFlow SPU {SPU_VERSION}, protocol {o.protocol}, field {self.field}, "
                   f"{self.fraction_bits()} fractional bits; the plan (BatchNorm folded, pre-activation "
                   f"BN: {o.pre_mode}) is traced to JAX and compiled by SPU; parties in .venv-spu over "
                   "SPU's brpc link " + ("on loopback" if o.local_parties == "all" else
                                         "between hosts (brpc's own TLS is off: see the channel line)")
                   + "; traffic = SPU's link statistics (bytes, messages = send "
                   "actions; SPU does not count rounds) plus the shares exchanged outside SPU's runs; "
                   "WAN/LAN latency rows are projections charging one round trip per message"),
        )

    def _channel_text(self) -> str:
        """What carried SPU's brpc link (the threat model's channel line, channel_encrypted's note)."""
        o = self.options
        if o.local_parties == "all":
            return ("channels: loopback on one host (SPU's brpc link as plain TCP; nothing leaves "
                    "the machine)")
        if o.channel == "tls-vpn":
            return ("channels: ENCRYPTED between hosts: SPU's brpc link runs inside an OpenVPN tunnel "
                    "between the two hosts started by the suite (backends.mpc.tunnel: TLS 1.3, both ends "
                    "authenticated by per-run Ed25519 certificates, data channel AES-256-GCM); both link "
                    "addresses are tunnel addresses and the route to the model owner's was checked to "
                    "run through a tun device; an observer of the network sees packet sizes and timing only")
        return ("channels: PLAIN TCP between hosts (SPU's brpc link without TLS and no tunnel, "
                "channel=plain): anyone who can watch the link reads everything the parties send each "
                "other (input shares, every opened value, the seeds of their shared randomness), hence "
                "both inputs; use channel=tls-vpn (backends.mpc.tunnel)")

    def versions(self) -> dict[str, str]:
        return {"spu": SPU_VERSION, "jax": "<=0.4.34 (.venv-spu)"}

    # ------------------------------------------------------------------ lifecycle

    def setup(self, ctx: BackendContext) -> None:
        from backends.mpc.graph import plan_to_dict

        o = self.options
        plan, params = self._model_owner_plan(ctx)
        addr, port0 = self._master_address()
        addr1 = o.data_owner_addr or addr
        port1 = int(o.data_owner_port or free_port(addr1))
        while port1 == port0 and not o.data_owner_port:
            port1 = free_port(addr1)
        threads = max(1, int(ctx.threads) // 2)
        settings = {
            "parties": [f"{addr}:{port0}", f"{addr1}:{port1}"],
            "protocol": o.protocol, "field": self.field, "fxp_fraction_bits": o.fxp_fraction_bits,
            "reveal_to": o.reveal_to, "timeout_s": o.timeout_s,
            "workdir": str(Path(ctx.workdir) / "spu"),
            "record_dir": os.environ.get("MPC_RECORD_DIR") or None,
            # tests only: where each party reaches the other (a recording proxy)
            "connect_via": [v for v in os.environ.get("MPC_SPU_CONNECT_VIA", "").split(",") if v] or None,
        }
        # local_parties=data_owner: the model owner's party runs on its own host
        # (`python -m backends.mpc.spu_engine model-owner`), this worker starts only ours
        self._local = (0, 1) if o.local_parties == "all" else (1,)
        for rank in self._local:
            self._procs[rank], self._conns[rank] = _start_spu_party(rank, settings, threads)
        # the model owner gets its own folded model (float arrays, no torch on its side); the
        # data owner nothing: party 0 sends it the architecture over the link
        if 0 in self._procs:
            self._send(0, ("setup", plan_to_dict(plan), _packed_params(params)), "setup (sharing the model)")
        res = getattr(ctx.model, "resolution", None)
        hints = [[self.batch_size(), 1, int(res), int(res)]] if res else []
        self._send(1, ("setup", None, None, hints), "setup (sharing the model, compiling)")
        replies = self._wait("setup (sharing the model)")
        for rank, reply in replies.items():
            self._record(rank, reply, phase="setup")

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        from scipy.special import expit

        from backends.mpc.codec import pack, unpack

        self._step = f"batch {len(self._batches) + 1}"
        x = np.ascontiguousarray(images, dtype=np.float32)
        if self._resolution and x.shape[-1] != self._resolution:
            import torch
            import torchxrayvision as xrv  # data owner's own plaintext preprocessing

            x = xrv.utils.fix_resolution(torch.from_numpy(x), self._resolution, None).numpy()
        shape = tuple(x.shape)
        step = f"secure inference, {self._step} ({shape[0]} images)"
        self._send(1, ("infer", pack(x)), step)
        replies = self._wait(step)
        for rank, reply in replies.items():
            self._record(rank, reply, phase=None)
        packed = replies[1]["logits"]
        logits = unpack(packed) if packed is not None else None
        if logits is None or tuple(logits.shape) != (shape[0], self._n_labels):
            raise MPCPartyError(f"data owner received no logits of shape {(shape[0], self._n_labels)}")
        self._batches.append({"n": shape[0], "local_s": replies[1]["local_s"],
                              "cpu_s": {r: replies[r]["cpu_s"] for r in replies},
                              "traffic": {r: replies[r]["traffic"] for r in replies}})
        self.last_logits = logits
        return expit(logits.astype(np.float64))

    def teardown(self) -> None:
        # a party that died leaves its peer blocked in a link receive: nobody will answer a
        # stop, so end the survivors now instead of waiting for them
        if self._dead():
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.terminate()
        super().teardown()

    # ------------------------------------------------------------------ accounting

    def _record(self, rank: int, reply: dict, phase: str | None) -> None:
        t = reply["traffic"]
        # SPU counts messages (send actions), not rounds: no rounds are claimed
        self._meter.record(METER_PARTY[rank], sent=t["sent"], received=t["received"],
                           rounds=0, messages=t["messages"], phase=phase)
        self._peak_rss[rank] = max(self._peak_rss.get(rank, 0), int(reply.get("peak_rss", 0)))

    def _batch_rounds(self, batch: dict, local: list[int]) -> int:
        return max(batch["traffic"][r]["messages"] for r in local)

    _ROUNDS_TERM = ("R = messages (send actions) of the busier party per batch, an upper bound on "
                    "its rounds (SPU does not count rounds)")

    def extra_rows(self) -> list[dict]:
        rows = super().extra_rows()
        n = sum(b["n"] for b in self._batches)
        for rank in sorted(self._batches[0]["traffic"]) if self._batches else ():
            rows.append({"metric": "party_messages_per_image", "unit": "messages", "higher_is_better": False,
                         "value": sum(b["traffic"][rank]["messages"] for b in self._batches) / n,
                         "party": METER_PARTY[rank], "phase": "online",
                         "note": "messages (send actions) the party sent per image: SPU's link statistics "
                                 "plus the shares it sent outside SPU's runs; SPU does not count rounds"})
        return rows


def _start_spu_party(rank: int, settings: dict[str, Any], threads: int):
    """Start party `rank` as `.venv-spu/bin/python -m backends.mpc.spu_party`, over a socketpair."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
                "JAX_PLATFORMS": "cpu", "PYTHONNOUSERSITE": "1"})
    return start_party(str(spu_python()), "backends.mpc.spu_party", rank, env, settings)


def _packed_params(params: dict) -> dict:
    """The folded parameters as raw float64 arrays (the SPU environment has no torch)."""
    from backends.mpc.codec import pack

    return {k: pack(v.detach().double().numpy()) for k, v in params.items()}


# ------------------------------------------------------------------ the model owner on its own host

def model_owner_main(argv: list[str] | None = None) -> int:
    """`python -m backends.mpc.spu_engine model-owner ...`: the vendor's side of a two-host SPU
    session, for a data owner running `--backends mpc:engine=spu:local_parties=data_owner`.

    This process (the suite's environment: it folds the checkpoint with torch) starts party 0
    from `.venv-spu/` and hands it the folded model; party 0 then serves one session and exits
    when the data owner says stop. Its per-step traffic goes to stderr
    (`[model_owner] result: sent N B, received M B, messages K`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m backends.mpc.spu_engine model-owner",
                                description="run the model owner (party 0) of a two-host SPU session")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="this party's brpc link address (the data owner's master_addr:master_port)")
    p.add_argument("--data-owner", required=True, metavar="ADDR:PORT",
                   help="where the data owner's link listens (its data_owner_addr:data_owner_port)")
    p.add_argument("--checkpoint", required=True, help="a model checkpoint written by `suite train`")
    p.add_argument("--labels", required=True, help="comma-separated output labels, in the data owner's order")
    p.add_argument("--protocol", choices=PROTOCOLS, default="semi2k")
    p.add_argument("--field", choices=tuple(FIELDS), default="FM64")
    p.add_argument("--fxp-fraction-bits", type=int, default=0)
    p.add_argument("--reveal-to", choices=("data_owner", "both"), default="data_owner")
    p.add_argument("--pre-mode", choices=("split", "mul"), default="split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--workdir", default=".", help="where SPU's log (its link statistics) is written")
    a = p.parse_args(argv)
    for flag, addr in (("--listen", a.listen), ("--data-owner", a.data_owner)):
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            p.error(f"{flag} wants ADDR:PORT, got '{addr}'")
    if not spu_available():
        p.error(f"needs SecretFlow SPU {SPU_VERSION} in {spu_venv()}/ (bash scripts/setup.sh)")
    from backends.mpc.graph import plan_to_dict
    from backends.mpc.party_process import recv, send
    from backends.mpc.plan import build_plan
    from suite.models import load_checkpoint

    bundle = load_checkpoint(Path(a.checkpoint)).restricted([x for x in a.labels.split(",") if x])
    plan, params = build_plan(bundle.net, a.pre_mode)
    settings = {"parties": [a.listen, a.data_owner], "protocol": a.protocol, "field": a.field,
                "fxp_fraction_bits": a.fxp_fraction_bits, "reveal_to": a.reveal_to,
                "timeout_s": a.timeout_s, "workdir": str(Path(a.workdir).resolve() / "spu"),
                "record_dir": os.environ.get("MPC_RECORD_DIR") or None, "connect_via": None}
    proc, conn = _start_spu_party(0, settings, a.threads)
    try:
        send(conn, ("setup", plan_to_dict(plan), _packed_params(params)))
        params = None
        while True:
            if not conn.poll(0.5):
                if proc.poll() is not None:
                    break
                continue
            try:
                kind, payload = recv(conn)
            except (EOFError, OSError):
                break
            if kind == "error":
                lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
                print(f"[model_owner] failed: {lines[-1] if lines else payload}", file=sys.stderr, flush=True)
                proc.wait(timeout=30)
                return 1
            t = payload["traffic"]
            print(f"[model_owner] {kind}: sent {t['sent']} B, received {t['received']} B, "
                  f"messages {t['messages']}", file=sys.stderr, flush=True)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        conn.close()


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["model-owner"]:
        sys.exit(model_owner_main(sys.argv[2:]))
    sys.exit("usage: python -m backends.mpc.spu_engine model-owner --listen ADDR:PORT --data-owner "
             "ADDR:PORT --checkpoint MODEL.pt --labels A,B,... (the benchmark side runs through the "
             "suite: --backends mpc:engine=spu:local_parties=data_owner:...)")
