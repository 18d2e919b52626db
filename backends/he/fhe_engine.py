"""Whole-network FHE: `he:engine=desilo` runs the suite's DenseNet end to end under CKKS
with bootstrapping, and `he:engine=desilo-plaintext` is its control.

The model owner compiles its DenseNet (`backends.he.fhe_compile`: BatchNorm folded, no
concatenation, polyphase stem, ReLU and max-pool by one polynomial ReLU) into a `Program`;
the parties (`backends.he.fhe_party`) run from their own environment, `.venv-fhe/`
(desilofhe 2.0.0 wheels exist for Python 3.12; created by scripts/setup.sh), as one child
process of the benchmark worker. The data owner keeps the secret key; the model owner
evaluates every convolution, normalisation, activation, pooling and the classifier on
ciphertexts, bootstrapping when a ciphertext runs out of levels.

The control row runs the same compiled program in float64 with the same polynomial ReLU:
its ΔAUROC / max |Δp| against `plaintext` is the cost of HE-friendliness, the encrypted
row's against the control is the cost of encryption alone.

Bootstrap key options (option `fhe_keys`), one bootstrap each, desilofhe 2.0.0 CPU, N = 2^16,
measured on the shared 2-core / 23 GB machine UNDER LOAD (load average 8-18) unless marked
quiet; `backends/he/fhe_bootstrap_keys.py` (killed above a resident-memory cap so other jobs
keep their memory) and `backends/he/fhe_openfhe_bootstrap.py`:

  option              key bytes                         one bootstrap             notes
  small+roll          roll 3.85 GB + small bootstrap    250 s wall quiet (283 s   the default: the only option
  (default)           264 MB (+ relin 257 MB, conj      user+sys for the whole    that fits here; max err 3.2e-5,
                      257 MB); ~5.8 GB resident         process: one core);       17 levels after; thread_count=2
                                                        976 s under heavy load    not honoured (mode="cpu": 1 core)
  full-small          -                                 -                         refused by 2.0.0: "Create Bootstrap
                                                                                  Key: invalid size" (medium | large)
  full-medium         > 14 GB resident while the key    not reached               killed by the 14 GB cap after 579 s
                      is generated (1.x docs: 12.3 GB)                            wall / 143 s CPU, key unfinished
  full-large,         larger than full-medium (1.x      not run                   cannot fit next to other jobs in
  evaluation-medium   docs: 15.2 GB; the evaluation                               23 GB
                      key holds a bootstrap key)
  OpenFHE 1.6.1       > 11.9 GB resident while keys     not reached               N = 2^16, HEStd_128_classic, level
  (comparison)        are generated                                               budget [3, 3], 10 levels after, 40-bit
                                                                                  primes; stopped at 11.9 GB after 255 s
                                                                                  wall / 75 s CPU, keys unfinished

So on this machine every faster bootstrap needs more memory than it has to spare, and the
pass runs with small+roll. The pass (64 px, default g3-g3-g3-f3-f3 ReLU) as the level model
plans it (the evaluator's own code on level numbers): 28 bootstraps (39 before the depth-3
polynomial stages), 695 rotations, 5,175 plaintext products, 125 polynomial stages; ESTIMATED
39.5 ks per image from per-primitive seconds measured under heavy load (bootstraps 27.3 ks of
it); the bootstraps alone at the quiet 250 s are 7.0 ks, 12x the 600 s target. The target
needs bootstraps of at most ~15 s each (600 s / 28, less the linear ops); candidates, not
measured here: desilofhe's full bootstrap key on a machine with memory to spare (>= 32 GB),
OpenFHE's bootstrap likewise, or a GPU.

Through the suite (`python -m suite run --backends plaintext,he,he:engine=desilo --quick
--timeout 2400`, UNDER LOAD, load average 15-27): keys generated and written in ~6 min (4.66 GB
data owner -> model owner, metered as setup traffic), the model owner loaded them and the pass
started, then the machine ran out of memory to spare: both parties in one process held 10.8 GB
resident (the data owner's freed key memory is not returned before the model owner reads the
keys), and a watcher outside the suite (kill when the shared machine's available memory falls
under 1.5 GB) stopped it; no encrypted pass has finished yet. Control row in that run: max |dp| 0.0082 vs plaintext, ΔAUROC -0.001.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from backends.he.options import HEOptions
from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.errors import BackendUnavailable, SuiteError
from suite.threat_model import ThreatModel

ROOT = Path(__file__).resolve().parents[2]
FHE_ENGINES = ("desilo", "desilo-plaintext")
DESILO_VERSION = "2.0.0"
FHE_MAX_IMAGES = 1           # default images for the encrypted row (minutes to hours each)
#: desilofhe's bootstrappable CPU preset (Engine(bootstrap=True)): ring degree and slots
DESILO_RING_DEGREE = 65536
INTERNAL = "backend-internal perf_counter breakdown; the harness's latency rows are authoritative"


def fhe_venv() -> Path:
    """The engine's own environment: .venv-fhe/ at the repo root ($FHE_VENV overrides)."""
    return Path(os.environ.get("FHE_VENV") or ROOT / ".venv-fhe")


def fhe_available() -> bool:
    """Created and completely installed by scripts/setup.sh (its stamp file is written last)."""
    return (fhe_venv() / "bin" / "python").exists() and (fhe_venv() / ".fhe-installed").exists()


def _row(metric: str, value, unit: str, higher_is_better=None, note: str | None = None, **kw) -> dict:
    out = {"metric": metric, "value": value, "unit": unit, "higher_is_better": higher_is_better, **kw}
    if note:
        out["note"] = note
    return out


def relu_stages(options: HEOptions) -> tuple[str, ...]:
    from backends.he.fhe_program import STAGES

    stages = tuple(s for s in str(options.fhe_relu_stages).split("-") if s)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise SuiteError(f"he fhe_relu_stages={options.fhe_relu_stages!r}: use stage names from "
                         f"{sorted(STAGES)} joined by '-', e.g. g3-g3-f3")
    return stages


def fhe_resolution(ctx: BackendContext, options: HEOptions) -> int:
    """The input side the program is compiled for: the model's, or a smaller twin's (the same
    weights on a downsampled image; DenseNet's global pool makes that well defined)."""
    model_res = int(getattr(ctx.model, "resolution", 64))
    res = int(options.fhe_resolution) or model_res
    if res < 32 or res > model_res or res % 2:
        raise SuiteError(f"he fhe_resolution={res}: use an even side between 32 (the small DenseNet's "
                         f"three transitions need it) and the model's {model_res}")
    return res


def fhe_keys(options: HEOptions) -> str:
    """The bootstrap / rotation key option (backends/he/fhe_party.py KEY_OPTIONS)."""
    from backends.he.fhe_party import KEY_OPTIONS

    if options.fhe_keys not in KEY_OPTIONS:
        raise SuiteError(f"he fhe_keys={options.fhe_keys!r}: use one of {', '.join(KEY_OPTIONS)}")
    return options.fhe_keys


def _program(ctx: BackendContext, options: HEOptions, slots: int):
    from backends.he.fhe_compile import compile_densenet

    return compile_densenet(ctx.model.net, fhe_resolution(ctx, options), slots,
                            relu_stages=relu_stages(options))


def _fit_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    if images.shape[-1] == resolution:
        return images
    import torch
    import torchxrayvision as xrv  # data owner's own plaintext preprocessing

    return xrv.utils.fix_resolution(torch.from_numpy(images), resolution, None).numpy()


class FHEPlaintextControl(Backend):
    """he:engine=desilo-plaintext: the compiled HE-friendly DenseNet in float64 (no protection)."""

    name = "he"
    track = "inference"
    tolerance = None
    Options = HEOptions

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        self.stats: dict[str, Any] = {"n": 0, "max_abs_diff_exact": 0.0}
        self.program = None

    def max_images(self) -> int | None:
        return int(self.options.max_images) or None

    def threat_model(self) -> ThreatModel:
        return ThreatModel(
            protects=(), from_whom="nobody", adversary="none considered",
            parties=("one host holding images and the compiled HE-friendly DenseNet",),
            trust_assumptions=("control row: the host sees images, weights and predictions",),
            guarantee_kind="none",
            guarantee=("no protection: the program he[engine=desilo] evaluates (the suite's DenseNet with "
                       "BatchNorm folded and ReLU / max-pool by a polynomial ReLU) in float64 on the same "
                       "images; its ΔAUROC vs plaintext is the cost of HE-friendliness"),
            leaks=("input images", "model weights", "predictions"),
            protected_scope="nothing",
        )

    def setup(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.resolution = fhe_resolution(ctx, self.options)
        self.program = _program(ctx, self.options, DESILO_RING_DEGREE // 2)

    def _packed(self, images: np.ndarray) -> list[np.ndarray]:
        from backends.he.fhe_compile import pack_image

        x = _fit_resolution(np.ascontiguousarray(images, dtype=np.float32), self.resolution)
        return [pack_image(self.program, img[0]) for img in x]

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        logits = np.stack([self.program.run_plain(v) for v in self._packed(images)])
        self.stats["n"] += len(images)
        return expit(logits)

    def extra_rows(self) -> list[dict]:
        p = self.program
        if p is None:
            return []
        return [
            _row("fhe_polynomial_relus", p.relu_count(), "ops", False,
                 f"ReLU and max-pool (max(a,b) = b + relu(a-b)) by x(1+s(x))/2, s = composition "
                 f"{'∘'.join(reversed(p.relu_stages))} of degree-7 odd polynomials on [-1, 1]"),
            _row("fhe_calibration_margin", p.meta.get("margin"), "x", None,
                 f"register scales = margin x largest |value| on {p.meta.get('calibration_images')} "
                 "public synthetic calibration images"),
            _row("protected_mac_fraction", 0.0, "fraction", True,
                 "control row: nothing runs under protection"),
            _row("fhe_input_resolution", self.resolution, "px", None,
                 "side of the image the program runs on"
                 + ("" if self.resolution == int(getattr(self.ctx.model, "resolution", self.resolution))
                    else " (a smaller twin: the model's weights on the downsampled image)")),
        ]


def measured_op_costs(images: list[dict]):
    """Per-operation seconds measured in this run's encrypted images (None before any)."""
    from backends.he.fhe_estimate import OpCosts

    tot = {k: sum(im.get(k, 0) for im in images) for k in
           ("rotations", "rotation_s", "plain_mults", "plain_mult_s", "relus", "poly_s", "ct_mult_s",
            "bootstraps", "bootstrap_s")}
    if not (tot["rotations"] and tot["plain_mults"] and tot["relus"] and tot["bootstraps"]):
        return None
    return OpCosts(rotation_s=tot["rotation_s"] / tot["rotations"],
                   plain_mult_s=tot["plain_mult_s"] / tot["plain_mults"],
                   relu_s=(tot["poly_s"] + tot["ct_mult_s"]) / tot["relus"],
                   bootstrap_s=tot["bootstrap_s"] / tot["bootstraps"],
                   bootstraps_per_relu=tot["bootstraps"] / tot["relus"])


class FHEBackend(FHEPlaintextControl):
    """he:engine=desilo: the whole DenseNet under CKKS with bootstrapping (desilofhe, CPU)."""

    default_batch_size = 1

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        if not fhe_available():
            raise BackendUnavailable(
                f"he engine=desilo needs desilofhe {DESILO_VERSION} in its own environment {fhe_venv()}/, "
                "which is missing: create it with `bash scripts/setup.sh` (needs python3.12)")
        fhe_keys(self.options)
        self._proc = self._conn = None
        self.images: list[dict] = []
        self.setup_info: dict[str, Any] = {}

    def max_images(self) -> int | None:
        return int(self.options.max_images) or FHE_MAX_IMAGES

    def reference(self):
        return FHEPlaintextControl(dataclasses.replace(self.options, engine="desilo-plaintext"))

    def threat_model(self) -> ThreatModel:
        return ThreatModel(
            protects=("input_images", "model_weights"),
            from_whom=("model owner (vendor) for the images; data owner (hospital) for the weights, of "
                       "which it receives only encrypted logits"),
            adversary="semi-honest (honest-but-curious) model owner and data owner",
            parties=("data owner (hospital)", "model owner (vendor)"),
            trust_assumptions=(
                "both parties follow the protocol: CKKS gives no integrity",
                "the secret key stays with the data owner; the model owner reads evaluation keys only "
                f"(public, relinearisation, conjugation and {self._key_words()})",
                "RLWE is hard at desilofhe's bootstrappable preset (ring degree 2^16); its 128-bit "
                "level is the library's claim: desilofhe does not expose the modulus chain, so the "
                "suite cannot check it against the HomomorphicEncryption.org table itself",
                "the register scales come from public calibration images: an image whose activations "
                "exceed them by more than the margin leaves [-1, 1] and gets wrong outputs (no leak)",
            ),
            guarantee_kind="cryptographic",
            guarantee=("IND-CPA CKKS (RLWE) with bootstrapping: every convolution, normalisation, "
                       "activation, pooling and the classifier of the HE-friendly DenseNet run on "
                       "ciphertexts; the model owner sees only ciphertexts, the data owner decrypts only "
                       "the logits (every other slot is zero)"),
            leaks=(
                "the architecture, the packing and the number of images, to the model owner",
                "logits and probabilities, to the data owner only (repeated queries allow "
                "model-extraction attacks, as with any prediction API)",
                "no circuit privacy: returned ciphertexts are not noise-flooded, so their CKKS noise "
                "may carry information about the weights",
                "ReLU and max-pool are polynomial approximations: outputs differ from the model by "
                "the control row's error",
            ),
            protected_scope=("entire HE-friendly DenseNet (100% of its multiply-accumulates): all "
                             "convolutions, BatchNorm (folded / diagonal), polynomial ReLU, max-pool "
                             "(polynomial), average pools, classifier"),
            notes=(f"desilofhe {DESILO_VERSION} CPU, CKKS N=2^16 ({DESILO_RING_DEGREE // 2} slots), one "
                   "ciphertext per image (channel-major packing, polyphase input), baby-step giant-step "
                   "diagonal linear ops, both parties in one child process in .venv-fhe exchanging "
                   "serialised keys and ciphertexts only"),
        )

    def _key_words(self) -> str:
        if self.options.fhe_keys == "small+roll":
            return "the general roll key with the small bootstrapping key"
        return (f"desilofhe's full bootstrapping key, size {self.options.fhe_keys.split('-', 1)[1]} (its fixed "
                "rotation keys also serve the program's rotations; not run on the 23 GB test machine)")

    def versions(self) -> dict[str, str]:
        return {"desilofhe": self.setup_info.get("version", DESILO_VERSION) + " (.venv-fhe)"}

    # ------------------------------------------------------------------ lifecycle

    def setup(self, ctx: BackendContext) -> None:
        from backends.mpc.party_process import recv, start_party

        super().setup(ctx)
        work = Path(ctx.workdir) / "fhe"
        work.mkdir(parents=True, exist_ok=True)
        program_path = work / "program.npz"
        program_path.write_bytes(self.program.to_bytes())   # stays with the model owner
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
        env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(ctx.threads), "PYTHONNOUSERSITE": "1"})
        settings = {"program": str(program_path), "workdir": str(work), "threads": int(ctx.threads),
                    "keys": fhe_keys(self.options)}
        self._proc, self._conn = start_party(str(fhe_venv() / "bin" / "python"), "backends.he.fhe_party",
                                             0, env, settings)
        reply = self._reply(recv, "setup (key generation)")
        self.setup_info = reply
        sent = sum(reply["keys"].values())
        ctx.meter.record("data_owner", sent=sent, rounds=1, messages=len(reply["keys"]))
        ctx.meter.record("model_owner", received=sent, rounds=1)

    def _reply(self, recv, step: str) -> dict:
        try:
            reply = recv(self._conn)
        except (EOFError, OSError):
            code = self._proc.wait(timeout=30) if self._proc else None
            raise SuiteError(f"he engine=desilo: the FHE party died during {step} (exit code {code})") from None
        if not reply.get("ok"):
            raise SuiteError(f"he engine=desilo: {step} failed in the FHE party: {reply.get('error')}")
        return reply

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        from backends.mpc.party_process import recv, send

        packed = self._packed(images)
        send(self._conn, ("infer", [v.tolist() for v in packed]))
        reply = self._reply(recv, f"encrypted inference ({len(packed)} images)")
        logits = np.array([im["logits"] for im in reply["images"]], dtype=np.float64)
        plain = np.stack([self.program.run_plain(v) for v in packed])   # benchmark-side check only
        for im, ctrl in zip(reply["images"], expit(plain)):
            im["max_abs_diff"] = float(np.abs(expit(np.array(im["logits"])) - ctrl).max())
            self.ctx.meter.record("data_owner", sent=im["up"], received=im["down"], rounds=1, messages=1)
            self.ctx.meter.record("model_owner", sent=im["down"], received=im["up"], rounds=1, messages=1)
        self.images += reply["images"]
        self.setup_info["peak_rss"] = max(self.setup_info.get("peak_rss", 0), reply.get("peak_rss", 0))
        return expit(logits)

    def teardown(self) -> None:
        from backends.mpc.party_process import send

        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            send(self._conn, ("stop",))
            proc.wait(timeout=60)
        except Exception:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        keys = Path(self.ctx.workdir) / "fhe" / "keys"
        for f in keys.glob("*.key"):
            f.unlink()

    # ------------------------------------------------------------------ figures

    def _projection_rows(self) -> list[dict]:
        from backends.he.fhe_estimate import densenet_layers, estimate
        from suite.models import DENSENET121

        costs = measured_op_costs(self.images)
        if costs is None:
            return []
        a = DENSENET121
        layers = estimate(densenet_layers(a["growth_rate"], tuple(a["block_config"]), a["num_init_features"],
                                          a["bn_size"], 224), costs, DESILO_RING_DEGREE // 2)
        total = sum(layer["seconds"] for layer in layers)
        return [_row("projected_latency_per_image", total, "s", False,
                     "DenseNet-121 at 224 px under this engine: per-layer op counts "
                     "(backends/he/fhe_estimate.py) x the rotation, plaintext-product, polynomial-ReLU "
                     f"and bootstrap seconds measured in this run ({costs.rotation_s:.3g} / "
                     f"{costs.plain_mult_s:.3g} / {costs.relu_s:.3g} / {costs.bootstrap_s:.3g} s); "
                     f"{sum(layer['rotations'] for layer in layers):.0f} rotations, "
                     f"{sum(layer['plain_mults'] for layer in layers):.0f} plaintext products, "
                     f"{sum(layer['relu_cts'] for layer in layers):.0f} ReLU ciphertexts",
                     estimate="projected")]

    def extra_rows(self) -> list[dict]:
        rows = [r for r in super().extra_rows() if r["metric"] != "protected_mac_fraction"]
        info, ims = self.setup_info, self.images
        n = len(ims)

        def mean(key):
            return float(np.mean([im[key] for im in ims])) if n else None

        rows += [
            _row("protected_mac_fraction", 1.0, "fraction", True,
                 "every multiply-accumulate of the HE-friendly DenseNet ran on ciphertexts"),
            _row("fhe_bootstraps_per_image", mean("bootstraps"), "bootstraps", False, n=n),
            _row("fhe_rotations_per_image", mean("rotations"), "rotations", False, n=n),
            _row("fhe_plaintext_mults_per_image", mean("plain_mults"), "ops", False, n=n),
            _row("fhe_bootstrap_time_per_image", mean("bootstrap_s"), "s", False, INTERNAL, n=n),
            _row("he_encrypt_time_per_image", mean("encrypt_s"), "s", False, INTERNAL, n=n),
            _row("he_server_eval_time_per_image", mean("eval_s"), "s", False, INTERNAL, n=n),
            _row("he_decrypt_time_per_image", mean("decrypt_s"), "s", False, INTERNAL, n=n),
            _row("he_upload_bytes_per_image", mean("up"), "bytes", False, "one serialised ciphertext", n=n),
            _row("he_download_bytes_per_image", mean("down"), "bytes", False, "one serialised ciphertext", n=n),
            _row("encryption_max_abs_diff", max((im["max_abs_diff"] for im in ims), default=None),
                 "probability", False, "max |p_encrypted - p_control| vs he[engine=desilo-plaintext] "
                 "(the same program in float64): the cost of encryption alone", n=n),
            _row("key_generation_time", info.get("keygen_s"), "s", False, INTERNAL),
            _row("ckks_poly_modulus_degree", DESILO_RING_DEGREE, "", None, "desilofhe bootstrap preset"),
            _row("ckks_slots", info.get("slots"), "slots", None),
            _row("ckks_max_level", info.get("max_level"), "levels", None),
            _row("ckks_security_bits", 128, "bits", True,
                 "desilofhe's stated level for its bootstrappable preset, not checked by the suite "
                 "(the library does not expose its modulus chain)"),
            _row("fhe_party_peak_rss", info.get("peak_rss"), "bytes", False,
                 "both parties' child process (.venv-fhe), VmHWM"),
        ]
        plan = info.get("plan") or {}
        if "bootstraps" in plan:
            rows += [_row("fhe_bootstraps_per_image", plan["bootstraps"], "bootstraps", False,
                          "the model owner's level plan (backends/he/fhe_eval.py level model)",
                          estimate="projected"),
                     _row("fhe_input_level", plan["input_level"], "levels", None,
                          "level the data owner encrypts at (lowest one needing no extra bootstrap)")]
        rows += self._projection_rows()
        for key, size in (info.get("keys") or {}).items():
            rows.append(_row(f"{key}_key_bytes", size, "bytes", False,
                             "serialised evaluation key, data owner -> model owner at setup"))
        return [r for r in rows if r["value"] is not None]
