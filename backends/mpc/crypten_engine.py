"""Two-party secure inference with CrypTen: the whole DenseNet under MPC.

Parties (each its own OS process, children of the benchmark worker):
  party 0  model owner   holds the weights; with the dealer (triples=ttp, the default) it keeps
                         every product weight in clear and the data owner gets them once, masked
                         (W - b, b the dealer's uniform mask: `protocol.TwoPartyGates.plain_product`);
                         biases and shifts, and with tfp everything, it secret-shares
  party 1  data owner    holds the images; secret-shares them (`src=1`) and alone receives
                         the output logits (sigmoid applied by the receiver)
  party 2  dealer        only with `triples=ttp`: CrypTen's trusted third party, which
                         generates Beaver triples and sends party 0 its shares of them
This backend object, in the worker, is the orchestrator and the data owner's front end: it
hands party 1 the images over a local pipe (the hospital's own machine) and party 0 only the
batch shape, then receives the revealed outputs from party 1. The parties exchange nothing
but shares, through CrypTen's torch.distributed "gloo" transport.

The model owner folds BatchNorm and rewrites the network before sharing it
(`backends.mpc.plan`): every convolution, BN (folded), ReLU, pooling, concatenation and the
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
                  the 64-bit ring; the data owner learns only the number. With the default
                  scaling=channels every model here gets 24 (without it: the untrained small
                  DenseNet 21, a random DenseNet-121 at 224 px 19). The model owner then runs
                  its plan in a plaintext emulation of that fixed point on two calibration
                  images (mpc_plan.FixedPointOps, row fixed_point_logit_error) and, with
                  automatic precision, refuses a model whose logits it moves by more than
                  4e-3 (|dp| up to 1e-3, the bar every MPC row is held to). The
                  ring is 64-bit whatever the precision, so fewer bits cost nothing less. On
                  the default model fidelity (max |dp| <= 1e-3) breaks at 13 bits and below
                  (exact truncation); the untrained small DenseNet on the NIH sample needs 20
                  (max |dp| 5.6e-4 at 20 bits, 2e-3 at 19, 1.2e-4 at its automatic 21)
  triples         "ttp": a third-party dealer process generates Beaver triples (default);
                  "tfp": CrypTen's trusted first party = party 0 (the model owner) generates
                  them: faster, but then the model owner holds the triples' randomness and is
                  TRUSTED not to use it (with it, the masked values it receives reveal the
                  image), so images are protected from it by trust, not cryptography
  scaling         "channels" (default): before sharing, the model owner rescales every
                  feature channel by a power of two so its largest value on the calibration
                  images is ~1, and the classifier by a public power of two (the logits are
                  multiplied back by it, exactly): the float64 network is unchanged bit for bit,
                  but the largest product shrinks, so more fractional bits fit
                  (mpc_plan.balance_channels; random DenseNet-121 at 224 px: 24 bits instead
                  of 19, max |dlogit| ~1e-3 instead of ~3e-2); "none": the folded weights as
                  they are
  pre_mode        "split" (default) or "mul": how the pre-activation BatchNorms are made
                  exact without (split) or with (mul) a secure multiplication; see mpc_plan
  relu            "packed" (default): backends.mpc.protocol's two-party ReLU (carry-only MSB
                  circuit with bit packing, bit conversion merged with the multiplication:
                  8 rounds, ~40% of the bytes); "crypten": CrypTen's own x * (x >= 0)
  truncation      "exact" (default): products are divided by 2^p with a two-party protocol that
                  cannot wrap (backends.mpc.protocol.TwoPartyGates.truncate: one carry circuit,
                  ~ the cost of a ReLU, per product value); "local": CrypTen's local share
                  division, free but wrong by ~2^(64-p) with probability |y| * 2^(2p-64) per
                  value - negligible on a trained model, about one failure per hundred images
                  on a model with uncalibrated BatchNorm (activations in the thousands)
  rng             "csprng" (default): every random value (shares, masks, zero-sharing seeds,
                  the dealer's seeds and triples) from AES-256-CTR keyed from os.urandom
                  (backends/mpc/csprng.py); "torch": CrypTen's stock MT19937 generators,
                  INSECURE (a party rebuilds the other's stream from what it receives), kept
                  only to measure the CSPRNG's cost; its row's guarantee says so
  dealer_host     with triples=ttp, who hosts the dealer in the deployment this row describes:
                  "third_party" (default: a host of its own, non-colluding), "model_owner" or
                  "data_owner" (co-located: that party can read the triples, so the other
                  party's input is protected from it by trust; the row says so)
  threads         torch threads per party (0 = half the run's threads, at least 1)
  reveal_to       "data_owner" (default) or "both"
  master_addr     rendezvous address (default $MPC_MASTER_ADDR or 127.0.0.1)
  master_port     rendezvous TCP port, hosted by party 0 (default $MPC_MASTER_PORT or a free
                  port). Across two machines, give the model owner's address and an open
                  port, and set GLOO_SOCKET_IFNAME to the interface the parties share.
  local_parties   "all" (default): the benchmark starts every party on this machine;
                  "data_owner": it starts only the data owner; the model owner (and, with
                  ttp, the dealer) run on other machines:
                    python -m backends.mpc.crypten_party model-owner --master-addr THIS_HOST \
                        --master-port P --checkpoint model.pt --labels L1,L2,... [--triples ...]
                    python -m backends.mpc.crypten_party dealer --master-addr MODEL_OWNER --master-port P
                  (same precision_bits / triples / relu / reveal_to on every side: the parties
                  check and refuse to start otherwise). Only the data owner's traffic and CPU
                  are measured then.
  timeout_s       longest wait for a party in one step (setup, one batch); a party that
                  exits or hangs ends the run with a clear error (default 900)
  engine          "crypten" (default, this module) or "spu": SecretFlow SPU parties in
                  .venv-spu/ (backends/mpc/spu_engine.py), with its own options protocol
                  (semi2k | cheetah), field (FM64 | FM128), fxp_fraction_bits,
                  data_owner_addr and data_owner_port; they are rejected with engine=crypten

Traffic is counted inside each party (bytes sent / received, rounds = communication
calls) and reported per batch through the harness's meter; the triple dealer's traffic is
reported as its own party. Extra rows give each party's peak RSS and CPU time per image,
and the latency projected for a LAN and a WAN from the measured rounds, bytes and CPU time.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from backends.mpc.options import MPCOptions  # noqa: F401  (re-exported)
from backends.mpc.parties import (METER_PARTY, MPCPartyError, PartyBackend,  # noqa: F401
                                  free_port)
from backends.mpc.party_process import ROOT, start_party
from suite.backend import BackendContext, BatchMeta
from suite.errors import SuiteError
from suite.threat_model import ThreatModel


class CrypTenBackend(PartyBackend):
    """`mpc` with engine=crypten: CrypTen parties in this environment."""

    requires = ("crypten", "omegaconf", "yaml")

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
        if o.scaling not in ("channels", "none"):
            raise SuiteError(f"mpc option scaling must be 'channels' or 'none', got '{o.scaling}'")
        if o.rng not in ("csprng", "torch"):
            raise SuiteError(f"mpc option rng must be 'csprng' or 'torch', got '{o.rng}'")
        if o.dealer_host not in ("third_party", "model_owner", "data_owner"):
            raise SuiteError(f"mpc option dealer_host must be 'third_party', 'model_owner' or "
                             f"'data_owner', got '{o.dealer_host}'")
        if o.dealer_host != "third_party" and o.triples != "ttp":
            raise SuiteError("mpc option dealer_host applies to triples=ttp only")
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
        if o.triples == "ttp" and o.dealer_host == "third_party":
            parties.append("triple dealer (party 2: generates Beaver triples, sees no data; "
                           "on a host of its own)")
            triples = ("a third-party dealer, on its own host, generates the Beaver triples and "
                       "does not collude with either party")
            protection = "input images from the model owner, model weights from the data owner"
        elif o.triples == "ttp":
            host = o.dealer_host.replace("_", " ")
            parties.append(f"triple dealer (party 2: generates Beaver triples; hosted by the {host})")
            triples = (f"DEALER CO-LOCATED WITH THE {host.upper()}: the {host}'s host runs the dealer and "
                       f"can read every triple; it is trusted not to use them")
            protection = ("model weights from the data owner (cryptographic); images protected from "
                          "the model owner by trust" if o.dealer_host == "model_owner" else
                          "input images from the model owner (cryptographic); weights protected from "
                          "the data owner by trust")
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
                self._channel_text(),
            ),
            guarantee_kind="none" if o.rng == "torch" else "cryptographic",
            guarantee=(f"2-party additive secret sharing over Z_2^64 (CrypTen {self._crypten_version()}), "
                       f"fixed point with {self._precision_text()}; protects {protection}; "
                       + self._randomness_text()),
            leaks=self._leaks(),
            protected_scope="entire DenseNet (all convolutions, BN (folded), ReLU, pooling, "
                            "concatenation, classifier)",
            simulated=False,
            notes=(f"BatchNorm folded by the model owner (pre-activation BN: {o.pre_mode}"
                   + ("; feature channels rescaled by powers of two, logits unchanged" if o.scaling == "channels"
                      else "") + "); ReLU "
                   f"protocol: {o.relu}"
                   + (" (signs from a 32-bit comparison, one masked opening of y + 2^32 + r with the "
                      "dealer's r: exact for |y| < 2^32 ulp, a wrong sign beyond, which is a fidelity "
                      "failure, not a leak; row relu_comparison_headroom_bits)"
                      if self._narrow_relu() else "") + "; "
                   + ("all parties on one host over loopback; " if o.local_parties == "all" else "")
                   + "WAN/LAN latency rows are projections; "
                   + ("product weights stay with the model owner in clear, the data owner holds them "
                      "only one-time-padded by the dealer's mask (W - b); " if o.triples == "ttp" and
                      o.truncation == "exact" else "")
                   + (("fixed-point products are truncated exactly from the dealer's truncation pairs "
                       "(one masked opening; rounds stochastically to floor or one least significant "
                       "bit up, for |y| < 2^62)"
                       if o.triples == "ttp" else
                       "fixed-point products are truncated exactly (wrap bit from a carry circuit, "
                       "error at most one least significant bit)") if o.truncation == "exact" else
                      "fixed-point truncation is CrypTen's local one, which fails (a large error) "
                      "with probability ~|x| * 2^(2p-64) per product")),
        )

    def _narrow_relu(self) -> bool:
        cal = getattr(self, "_calibration", None)
        return cal is not None and cal.comparison_bits == 32

    def _leaks(self) -> tuple[str, ...]:
        return super()._leaks() + (
            "the fixed-point precision (fractional bits) to the data owner: chosen by the model owner "
            "from its calibration, it bounds the model's largest activation (rows "
            "fixed_point_precision_bits and fixed_point_headroom_bits give both figures)",
            "the ReLU comparison width to the data owner (32 bits when every ReLU input on the model "
            "owner's calibration images is below 2^(32-8) ulp, else 64: row relu_comparison_bits), "
            "a bound on the model's largest ReLU input",) + (
            ("the classifier's output scale to the data owner (scaling=channels: a power of two near "
             "the largest logit on the model owner's public calibration images)",)
            if self.options.scaling == "channels" else ()) + (
            ("the model owner's compute time per layer to the data owner, which tells whether all of a "
             "layer's fixed-point weights fit in 21 (or 43) bits: products skip empty weight limbs "
             "(backends/mpc/ring.py)",) if self.options.triples == "ttp" and self.options.truncation == "exact"
            else ())

    def _randomness_text(self) -> str:
        if self.options.rng == "torch":
            return ("INSECURE RANDOMNESS (rng=torch): shares, masks and triples come from MT19937, "
                    "whose state either party can rebuild from the values it receives; this row "
                    "protects nothing and exists only to measure the CSPRNG's cost")
        return ("every share, mask, zero-sharing seed and triple from AES-256-CTR keyed with "
                "256-bit keys from os.urandom (backends.mpc.csprng)")

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
        from backends.mpc.plan import gate_fixed_point, model_owner_fixed_point

        o = self.options
        plan, params = self._model_owner_plan(ctx)
        if o.local_parties == "all":     # this worker plays the model owner too
            try:
                plan, params, self._calibration, self._precision = model_owner_fixed_point(
                    plan, params, ctx.model.resolution, o.precision_bits, o.truncation, o.scaling,
                    **gate_fixed_point(o.triples, o.relu))
            except ValueError as exc:
                raise SuiteError(f"mpc: {exc}") from None
        else:                             # the remote model owner chooses; 0 adopts its choice
            self._calibration, self._precision = None, o.precision_bits
        addr, port = self._master_address()
        threads = o.threads or max(1, int(ctx.threads) // 2)
        settings = {
            "master_addr": addr, "master_port": port, "threads": threads,
            "triples": o.triples, "precision_bits": self._precision, "reveal_to": o.reveal_to,
            "timeout_s": o.timeout_s, "record_dir": os.environ.get("MPC_RECORD_DIR") or None,
            "profile": os.environ.get("MPC_PROFILE") == "1", "relu": o.relu,
            "cprofile_dir": os.environ.get("MPC_CPROFILE") or None,     # diagnostics: cProfile per party
            "truncation": o.truncation, "rng": o.rng,
            "comparison_bits": self._calibration.comparison_bits if self._calibration else 64,
            "faults": os.environ.get("MPC_PROTOCOL_FAULTS", ""),   # tests only: broken variants
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

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        import torch

        self._step = f"batch {len(self._batches) + 1}"
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self._resolution and x.shape[-1] != self._resolution:
            import torchxrayvision as xrv  # data owner's own plaintext preprocessing

            x = xrv.utils.fix_resolution(x, self._resolution, None)
        shape = tuple(x.shape)
        step = f"secure inference, {self._step} ({shape[0]} images)"
        # only the data owner is told; it announces the batch shape to the model owner
        dealer_before = _process_cpu_s(self._procs.get(2))
        self._send(1, ("infer", shape, x), step)
        replies = self._wait(step)
        dealer_cpu = _process_cpu_s(self._procs.get(2))
        for rank, reply in replies.items():
            self._record(rank, reply, phase=None)
        logits = replies[1]["logits"]
        if logits is None or tuple(logits.shape) != (shape[0], self._n_labels):
            raise MPCPartyError(f"data owner received no logits of shape {(shape[0], self._n_labels)}")
        self._batches.append({"n": shape[0], "local_s": replies[1]["local_s"],
                              "cpu_s": {r: replies[r]["cpu_s"] for r in replies},
                              "dealer_cpu_s": None if dealer_cpu is None or dealer_before is None
                              else dealer_cpu - dealer_before,
                              "profile": replies[1].get("profile"),
                              "traffic": {r: replies[r]["traffic"] for r in replies}})
        self.last_logits = logits          # diagnostics: the revealed logits, before sigmoid
        return torch.sigmoid(logits.double()).numpy()

    # ------------------------------------------------------------------ extra figures

    def _precision_rows(self) -> list[dict]:
        from backends.mpc.plan import EMULATED_IMAGES, gate_fixed_point

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
        if cal.logit_error is not None:
            rows.append({"metric": "fixed_point_logit_error", "value": cal.logit_error, "unit": "",
                         "higher_is_better": False, "estimate": "simulated",
                         "note": f"largest |logit change| fixed point causes at {self._precision} bits on "
                                 f"{min(cal.images, EMULATED_IMAGES)} of the calibration images, by the "
                                 f"model owner's plaintext emulation (mpc_plan.FixedPointOps); "
                                 f"|dp| <= a quarter of it"})
        if gate_fixed_point(self.options.triples, self.options.relu)["narrow_relu"]:
            rows.append({"metric": "relu_comparison_bits", "value": cal.comparison_bits, "unit": "bits",
                         "higher_is_better": False,
                         "note": "width of every ReLU's sign comparison (the max-pool's are 64): 32 when "
                                 "the ReLU inputs on the calibration images leave 2^8 headroom below "
                                 "2^32 ulp (automatic precision may give up one bit for it), else 64"})
            if cal.comparison_bits == 32:
                rows.append({"metric": "relu_comparison_headroom_bits", "unit": "bits", "higher_is_better": True,
                             "value": cal.comparison_headroom_bits(self._precision),
                             "note": f"log2(2^32 / (largest ReLU input * 2^p)) on {source}: how much larger "
                                     f"the data owner's ReLU inputs may be before a sign comes out wrong"})
        if self.options.truncation == "local":
            rows.append({"metric": "expected_truncation_failures_per_image",
                         "value": cal.local_failures_per_image(self._precision), "unit": "",
                         "higher_is_better": False,
                         "note": f"sum over products of |y| * 2^(2p-64) on {source}: each failure "
                                 f"corrupts one value by ~2^(64-p) (local truncation)"})
        return rows


    def extra_rows(self) -> list[dict]:
        return self._precision_rows() + super().extra_rows() + self._dealer_rows()

    def _dealer_rows(self) -> list[dict]:
        n = sum(b["n"] for b in self._batches)
        cpu = [b.get("dealer_cpu_s") for b in self._batches]
        if not n or not cpu or any(c is None for c in cpu):
            return []
        return [{"metric": "party_cpu_time_per_image", "unit": "s", "higher_is_better": False,
                 "value": sum(cpu) / n, "party": METER_PARTY[2], "phase": "online",
                 "note": "CPU seconds of the dealer process (user + system, read from /proc by the "
                         "orchestrator) while the parties computed the batches, per image"}]


def _process_cpu_s(proc: Any) -> float | None:
    """User + system CPU seconds of a local child process so far (None if not readable)."""
    if proc is None:
        return None
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _start_party(rank: int, settings: dict[str, Any], threads: int):
    """Start party `rank` as `python -m backends.mpc.crypten_party`, talking over a socketpair."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return start_party(sys.executable, "backends.mpc.crypten_party", rank, env, settings)
