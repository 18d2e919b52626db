"""Homomorphic encryption (TenSEAL CKKS): encrypted inference, honest about what ran encrypted.

Two configurations of one backend, chosen by option `mode`:

  head (default, inference track)
      The data owner runs the DenseNet feature extractor in plaintext (the model owner
      discloses those weights to it), encrypts the pooled feature vectors, and the model
      owner evaluates its classifier head (the Linear layer) on ciphertexts. Feature-major
      packing: one ciphertext per feature, one image per slot (backends/he/head.py).
  cnn (training track)
      A compact HE-friendly CNN (conv, square, average pooling, dense), trained by the
      backend on the training split at 28x28, evaluated end to end on encrypted images
      (backends/he/cnn.py). Its control, `he[mode=cnn-plaintext]` (the same CNN in
      plaintext on the same images), is scheduled automatically: the control's ΔAUROC vs
      `plaintext` is the cost of HE-friendliness, this row's ΔAUROC and max |Δp| vs the
      control are the cost of encryption.

The two parties are separate objects that exchange only bytes (serialised TenSEAL
contexts and ciphertexts); every byte that crosses is metered. The model owner's context
is deserialised from a copy without the secret key and checked to hold none.

Backend-internal timings (encryption, server evaluation, decryption per image) are
reported as extra rows; the harness's own latency is the authoritative total.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any

import numpy as np
from scipy.special import expit

from backends.he.options import HEOptions  # noqa: F401  (re-exported)
from backends.he.params import MAX_COEFF_BITS_128, STANDARD, resolve_params, security_rows
from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.errors import SuiteError
from suite.threat_model import ThreatModel

MODES = ("head", "cnn", "cnn-plaintext")
HEAD_CHUNK = 64          # images per plaintext feature-extractor forward pass (memory)
CNN_MAX_IMAGES = 140     # default stratified subset for the encrypted CNN (~0.3-1 s per image)


def _head_fraction(net, resolution) -> float | None:
    from backends.he.coverage import head_mac_fraction

    return head_mac_fraction(net, int(resolution)) if resolution else None


def _per_image(seconds: float, n: int) -> float | None:
    return seconds / n if n else None


def _row(metric: str, value, unit: str, higher_is_better=None, note: str | None = None, **kw) -> dict:
    out = {"metric": metric, "value": value, "unit": unit, "higher_is_better": higher_is_better, **kw}
    if note:
        out["note"] = note
    return out


INTERNAL = "backend-internal perf_counter breakdown; the harness's latency rows are authoritative"


class HEBackend(Backend):
    name = "he"
    track = "inference"
    extra = "he"
    requires = ("tenseal",)
    Options = HEOptions
    tolerance = 1e-3
    default_batch_size = 2048          # = slots at N=4096: one image per slot of each feature ciphertext
    test_options = {"batch_size": 16}
    conformance_variants = ({}, {"mode": "cnn", "max_images": 4})

    @classmethod
    def implementation(cls, options: BackendOptions) -> type[Backend]:
        mode = getattr(options, "mode", "head")
        engine = getattr(options, "engine", "tenseal")
        if engine != "tenseal":
            from backends.he.fhe_engine import FHE_ENGINES, FHEBackend, FHEPlaintextControl

            if engine not in FHE_ENGINES:
                raise SuiteError(f"backend 'he' option engine must be one of tenseal, {', '.join(FHE_ENGINES)}; "
                                 f"got '{engine}'")
            if mode != "head":
                raise SuiteError("backend 'he' option mode applies to engine=tenseal only")
            return FHEBackend if engine == "desilo" else FHEPlaintextControl
        if mode not in MODES:
            raise SuiteError(f"backend 'he' option mode must be one of {', '.join(MODES)}; got '{mode}'")
        return {"head": HEBackend, "cnn": HECNNBackend, "cnn-plaintext": HECNNPlaintextControl}[mode]

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        if self.options.coeff_mod_bit_sizes:   # '52/36/21' arrives as floats: keep whole bits
            bits = self.options.coeff_mod_bit_sizes
            if all(isinstance(b, (int, float)) and float(b) == int(b) for b in bits):
                self.options = dataclasses.replace(self.options, coeff_mod_bit_sizes=tuple(int(b) for b in bits))
        o = self.options
        mode = "head" if type(self) is HEBackend else "cnn"
        self.params = resolve_params(mode, o.poly_modulus_degree, o.coeff_mod_bit_sizes, o.scale_bits,
                                     o.allow_insecure)
        self._reset()

    def _reset(self) -> None:
        self.data_owner = self.model_owner = None
        self.stats: dict[str, Any] = {"n": 0, "feature_s": 0.0, "encrypt_s": 0.0, "eval_s": 0.0,
                                      "decrypt_s": 0.0, "up": 0, "down": 0, "messages": 0,
                                      "ciphertexts_up": 0, "ciphertexts_down": 0, "max_group": 0,
                                      "max_abs_diff": 0.0}
        self.setup_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ description

    def threat_model(self) -> ThreatModel:
        p = self.params
        secure = "128-bit" if p.is_secure() else "BELOW 128-bit (allow_insecure=true)"
        return ThreatModel(
            protects=("input_images",),
            from_whom="model owner (vendor): it receives only CKKS ciphertexts of the pooled features",
            adversary="semi-honest (honest-but-curious) model owner; semi-honest data owner",
            parties=("data owner (hospital)", "model owner (vendor)"),
            trust_assumptions=(
                "the model owner follows the protocol: CKKS gives no integrity, so a malicious model "
                "owner could return wrong logits undetected",
                "the secret key stays with the data owner; the model owner gets a public context "
                "(public key only, checked to hold no secret key)",
                "the model owner discloses its feature extractor (every DenseNet layer but the "
                "classifier) to the data owner, who runs it in plaintext",
                f"RLWE is hard at these parameters: {secure} per the {STANDARD}",
            ),
            guarantee_kind="cryptographic",
            guarantee=(f"IND-CPA CKKS encryption (RLWE), {p.describe()}, {secure}: the model owner "
                       "learns nothing about the images or their features beyond how many there are"),
            leaks=(
                "the model architecture and the feature extractor's weights (given to the data owner)",
                "the classifier head is hidden from inspection only: the data owner sees features and "
                "logits, so least squares on any F+1 images (48 for small-densenet) recovers the "
                "linear head; its weights are therefore not claimed as protected",
                "the number of images per batch, to the model owner",
                "logits and probabilities, to the data owner only",
                "no circuit privacy: returned ciphertexts are not noise-flooded",
            ),
            protected_scope=("classifier head only (1 of N layers: the final Linear layer, 1 of 21 weight "
                             "layers in small-densenet, 1 of 121 in DenseNet-121), feature extractor in "
                             "plaintext at the data owner"),
            notes=("feature-major packing: one ciphertext per pooled feature, one image per slot "
                   f"(up to {p.slots} images per ciphertext); the head is plaintext-scalar "
                   "multiply-and-add, no rotations or relinearisation keys needed"),
        )

    def versions(self) -> dict[str, str]:
        out = {}
        try:
            import tenseal

            out["tenseal"] = tenseal.__version__
        except ImportError:
            pass
        import torch

        out["torch"] = torch.__version__
        return out

    # ------------------------------------------------------------------ head mode

    def setup(self, ctx: BackendContext) -> None:
        import copy

        import torch

        from backends.he.head import HeadDataOwner, HeadModelOwner

        self._reset()
        self.ctx = ctx
        net = ctx.model.net
        self.torch = torch
        # model owner -> data owner: the feature extractor (everything but the classifier)
        extractor = copy.deepcopy(net)
        extractor.classifier = torch.nn.Identity()
        buf = io.BytesIO()
        torch.save(extractor.state_dict(), buf)
        extractor_bytes = buf.getvalue()
        self.extractor = extractor.eval()
        self.extractor.load_state_dict(torch.load(io.BytesIO(extractor_bytes), weights_only=True))
        # data owner: keys; public context -> model owner, who keeps only its head
        key_start = time.perf_counter()
        self.data_owner = HeadDataOwner(self.params)
        public = self.data_owner.public_context()
        weight = net.classifier.weight.detach().double().numpy().copy()
        bias = net.classifier.bias.detach().double().numpy().copy()
        self.model_owner = HeadModelOwner(public, weight, bias)
        self.setup_info = {
            "key_setup_s": time.perf_counter() - key_start,
            "public_context_bytes": len(public),
            "feature_extractor_bytes": len(extractor_bytes),
            "keys": self.data_owner.key_sizes(),
            "n_features": weight.shape[1], "n_labels": weight.shape[0],
            "n_weight_layers": sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in net.modules()),
            "head_mac_fraction": _head_fraction(net, getattr(ctx.model, "resolution", None)),
        }
        ctx.meter.record("data_owner", sent=len(public), received=len(extractor_bytes), rounds=1, messages=1)
        ctx.meter.record("model_owner", sent=len(extractor_bytes), received=len(public), rounds=1, messages=1)

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        torch = self.torch
        s = self.stats
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images))
            feats = torch.cat([self.extractor.features2(x[i:i + HEAD_CHUNK])
                               for i in range(0, len(x), HEAD_CHUNK)]).double().numpy()
        s["feature_s"] += time.perf_counter() - start
        logits = np.zeros((len(images), self.setup_info["n_labels"]))
        slots = self.params.slots
        for g in range(0, len(feats), slots):
            part = feats[g:g + slots]
            t0 = time.perf_counter()
            request = self.data_owner.request(part)
            t1 = time.perf_counter()
            response = self.model_owner.handle(request)
            t2 = time.perf_counter()
            logits[g:g + len(part)] = self.data_owner.open_response(response, len(part))
            t3 = time.perf_counter()
            self._account(t1 - t0, t2 - t1, t3 - t2, request, response, len(part),
                          up=self.setup_info["n_features"], down=self.setup_info["n_labels"])
        return expit(logits)

    def _account(self, enc_s, eval_s, dec_s, request: bytes, response: bytes, n: int, up: int,
                 down: int) -> None:
        s = self.stats
        s["encrypt_s"] += enc_s
        s["eval_s"] += eval_s
        s["decrypt_s"] += dec_s
        s["n"] += n
        s["up"] += len(request)
        s["down"] += len(response)
        s["messages"] += 2
        s["ciphertexts_up"] += up
        s["ciphertexts_down"] += down
        s["max_group"] = max(s["max_group"], n)
        self.ctx.meter.record("data_owner", sent=len(request), received=len(response), rounds=1, messages=1)
        self.ctx.meter.record("model_owner", sent=len(response), received=len(request), rounds=1, messages=1)

    def teardown(self) -> None:
        # Drop both parties' key material and weights; nothing runs outside this process.
        self.data_owner = self.model_owner = None
        self.extractor = None

    # ------------------------------------------------------------------ figures

    def extra_rows(self) -> list[dict]:
        s, info = self.stats, self.setup_info
        n = s["n"]
        rows = security_rows(self.params)
        rows += [
            _row("he_encrypt_time_per_image", _per_image(s["encrypt_s"], n), "s", False, INTERNAL
                 + "; data owner: encode, encrypt, serialise", n=n),
            _row("he_server_eval_time_per_image", _per_image(s["eval_s"], n), "s", False, INTERNAL
                 + "; model owner: deserialise, evaluate, serialise", n=n),
            _row("he_decrypt_time_per_image", _per_image(s["decrypt_s"], n), "s", False, INTERNAL
                 + "; data owner: deserialise, decrypt", n=n),
            _row("he_upload_bytes_per_image", _per_image(s["up"], n), "bytes", False,
                 "serialised ciphertexts data owner -> model owner", n=n),
            _row("he_download_bytes_per_image", _per_image(s["down"], n), "bytes", False,
                 "serialised ciphertexts model owner -> data owner", n=n),
            _row("he_ciphertexts_up", s["ciphertexts_up"], "ciphertexts", False, n=n),
            _row("he_ciphertexts_down", s["ciphertexts_down"], "ciphertexts", False, n=n),
            _row("key_setup_time", info.get("key_setup_s"), "s", False,
                 INTERNAL + "; key generation, public-context serialisation and the model owner's load"),
            _row("public_context_bytes", info.get("public_context_bytes"), "bytes", False,
                 "serialised public context the data owner sends (no secret key)"),
        ]
        for key, value in (info.get("keys") or {}).items():
            note = {"secret_key_bytes": "held by the data owner; never sent",
                    "galois_keys_bytes": "0: not generated (this mode needs no rotations)" if not value else
                    "rotation keys sent in the public context",
                    "relin_keys_bytes": "0: not sent (this mode needs no relinearisation)" if not value else
                    "relinearisation keys sent in the public context"}.get(key)
            rows.append(_row(key, value, "bytes", False, note))
        rows += self._mode_rows()
        return [r for r in rows if r["value"] is not None]


    def _mode_rows(self) -> list[dict]:
        s, info = self.stats, self.setup_info
        return [
            _row("he_images_per_ciphertext", s["max_group"], "images", True,
                 f"feature-major: one image per slot of each of the {info.get('n_features')} feature "
                 f"ciphertexts; a batch of up to {self.params.slots} images costs "
                 f"{info.get('n_features')} ciphertexts up and {info.get('n_labels')} down"),
            _row("feature_extractor_bytes", info.get("feature_extractor_bytes"), "bytes", False,
                 "setup: the model owner discloses the feature extractor to the data owner"),
            _row("he_feature_time_per_image", _per_image(s["feature_s"], s["n"]), "s", False,
                 INTERNAL + "; plaintext feature extractor at the data owner", n=s["n"]),
            _row("he_protected_layers", 1, "layers", True,
                 f"of {info.get('n_weight_layers')} weight layers (conv + linear) in this model"),
            _row("protected_mac_fraction", info.get("head_mac_fraction"), "fraction", True,
                 "classifier MACs / all conv + linear MACs of the DenseNet for one image at its "
                 "resolution: the feature extractor runs in plaintext at the data owner"),
        ]


class HECNNBackend(HEBackend):
    """mode=cnn: the HE-friendly CNN, trained here, evaluated end to end on encrypted images."""

    track = "training"
    tolerance = None             # a different model from the DenseNet: no promise to match it
    default_batch_size = 16
    encrypted = True

    def max_images(self) -> int | None:
        return int(self.options.max_images) or CNN_MAX_IMAGES

    def reference(self):
        return HEBackend.create(dataclasses.replace(self.options, mode="cnn-plaintext"))

    def _spec(self):
        from backends.he.cnn import CNNSpec

        o = self.options
        return CNNSpec(channels=int(o.cnn_channels), pool=int(o.cnn_pool), epochs=int(o.cnn_epochs))

    def threat_model(self) -> ThreatModel:
        p = self.params
        secure = "128-bit" if p.is_secure() else "BELOW 128-bit (allow_insecure=true)"
        return ThreatModel(
            protects=("input_images", "model_weights"),
            from_whom=("model owner (vendor) for the images; data owner (hospital) for the CNN's "
                       "weights, of which it receives only encrypted logits"),
            adversary="semi-honest (honest-but-curious) model owner and data owner",
            parties=("data owner (hospital)", "model owner (vendor)"),
            trust_assumptions=(
                "both parties follow the protocol: CKKS gives no integrity",
                "the secret key stays with the data owner; the model owner gets a public context "
                "(public, relinearisation and Galois keys; checked to hold no secret key)",
                f"RLWE is hard at these parameters: {secure} per the {STANDARD}",
            ),
            guarantee_kind="cryptographic",
            guarantee=(f"IND-CPA CKKS encryption (RLWE), {p.describe()}, {secure}: the whole CNN runs on "
                       "encrypted 28x28 images; the model owner sees only ciphertexts, the data owner "
                       "decrypts only the logits (every other slot is masked to zero)"),
            leaks=(
                "the CNN's architecture and layer sizes",
                "the number of images, to the model owner",
                "logits and probabilities, to the data owner only (repeated queries allow "
                "model-extraction attacks, as with any prediction API)",
                "no circuit privacy: returned ciphertexts are not noise-flooded, so their CKKS noise "
                "may carry information about the weights",
                "this is not the DenseNet: a smaller model on 28x28 images, with its own accuracy",
            ),
            protected_scope="whole HE-friendly CNN (not the DenseNet)",
            notes=(f"one image per ciphertext (im2col: 64 windows x 64 taps = 4096 values, {p.slots} "
                   f"slots at N={p.poly_modulus_degree}); L ciphertexts back, each holding one logit; "
                   "compare with the he[mode=cnn-plaintext] control for the cost of encryption alone"),
        )

    def setup(self, ctx: BackendContext) -> None:
        import torch

        from backends.he.cnn import CNNDataOwner, IM2COL_SLOTS

        self._reset()
        self.ctx = ctx
        self.torch = torch
        if self.params.slots < IM2COL_SLOTS:
            raise SuiteError(f"he mode=cnn needs at least {IM2COL_SLOTS} slots (N >= {2 * IM2COL_SLOTS}); "
                             f"got N={self.params.poly_modulus_degree}")
        key_start = time.perf_counter()
        self.data_owner = CNNDataOwner(self.params)
        self.public = self.data_owner.public_context()
        self.setup_info = {"key_setup_s": time.perf_counter() - key_start,
                           "public_context_bytes": len(self.public), "keys": self.data_owner.key_sizes()}
        ctx.meter.record("data_owner", sent=len(self.public), rounds=1, messages=1)
        ctx.meter.record("model_owner", received=len(self.public), rounds=1)

    def fit(self, train, ctx: BackendContext) -> None:
        from backends.he.cnn import CNNModelOwner, DeployedCNN, train_cnn

        start = time.perf_counter()
        net, info = train_cnn(train, list(range(len(train.label_names))), len(train.label_names),
                              self._spec(), ctx.seed, ctx.quick, ctx.cache_dir)
        self.deployed = DeployedCNN.from_net(net)
        self.setup_info.update(train_s=time.perf_counter() - start, train=info,
                               n_labels=len(train.label_names))
        if self.encrypted:
            self.model_owner = CNNModelOwner(self.public, self.deployed)

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        from backends.he.cnn import preprocess

        start = time.perf_counter()
        x28 = preprocess(images).double().numpy()
        self.stats["feature_s"] += time.perf_counter() - start
        t0 = time.perf_counter()
        request = self.data_owner.request(x28)
        t1 = time.perf_counter()
        response = self.model_owner.handle(request)
        t2 = time.perf_counter()
        n_labels = self.setup_info["n_labels"]
        logits = self.data_owner.open_response(response, n_labels)
        t3 = time.perf_counter()
        self._account(t1 - t0, t2 - t1, t3 - t2, request, response, len(images), up=len(images),
                      down=len(images) * n_labels)
        return expit(logits)

    def teardown(self) -> None:
        self.data_owner = self.model_owner = None
        self.public = None


    def _mode_rows(self) -> list[dict]:
        info, s = self.setup_info, self.stats
        return [
            _row("he_images_per_ciphertext", 1 if s["n"] else None, "images", True,
                 "im2col encoding: one image per ciphertext (64 windows x 64 taps = 4096 slots); "
                 f"{info.get('n_labels')} ciphertexts back per image, one logit each"),
            _row("he_preprocess_time_per_image", _per_image(s["feature_s"], s["n"]), "s", False,
                 INTERNAL + "; data owner downsamples to 28x28", n=s["n"]),
            *self._train_rows(),
            _row("cnn_parameters", self._n_params(), "", None,
                 f"conv 1->{self.options.cnn_channels} 7x7/3, square, avgpool {self.options.cnn_pool}, dense"),
            _row("protected_mac_fraction", 1.0, "fraction", True,
                 "every MAC of the HE-friendly CNN (not the DenseNet) ran on ciphertexts"),
        ]

    def _train_rows(self) -> list[dict]:
        info = self.setup_info
        train = info.get("train") or {}
        how = ("loaded from the cache: trained earlier with the same data, recipe and seed (e.g. by "
               "the control)" if train.get("cached") else "trained in this run")
        return [_row("cnn_train_time", info.get("train_s"), "s", False, f"HE-friendly CNN {how}"),
                _row("cnn_train_epochs", train.get("epochs"), "epochs", None, "suite recipe (Adam, OneCycle)"),
                _row("cnn_train_loss", train.get("loss"), "", False, "last-epoch masked BCE")]

    def _n_params(self) -> int | None:
        d = getattr(self, "deployed", None)
        if d is None:
            return None
        pool = int(self.options.cnn_pool)
        return int(d.kernels.size + d.conv_bias.size + d.dense.size / (pool * pool) + d.dense_bias.size)


class HECNNPlaintextControl(HECNNBackend):
    """mode=cnn-plaintext: the same HE-friendly CNN in plaintext, the control of mode=cnn.

    It is cheap, so it scores every test image unless max_images is given; comparisons with
    he[mode=cnn] are paired on the images both saw (the encrypted run's stratified prefix)."""

    encrypted = False

    def max_images(self) -> int | None:
        return int(self.options.max_images) or None

    def reference(self):
        return "plaintext"

    def threat_model(self) -> ThreatModel:
        return ThreatModel(
            protects=(),
            from_whom="nobody",
            adversary="none considered",
            parties=("one host holding images and the HE-friendly CNN",),
            trust_assumptions=("control row: the host sees images, weights and predictions",),
            guarantee_kind="none",
            guarantee=("no protection: the HE-friendly CNN of he[mode=cnn] in plaintext on the same "
                       "images; its ΔAUROC vs plaintext is the cost of HE-friendliness"),
            leaks=("input images", "model weights", "predictions"),
            protected_scope="nothing",
        )

    def setup(self, ctx: BackendContext) -> None:
        import torch

        self._reset()
        self.ctx = ctx
        self.torch = torch

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        from backends.he.cnn import preprocess

        self.stats["n"] += len(images)
        return expit(self.deployed.logits(preprocess(images).double().numpy()))

    def extra_rows(self) -> list[dict]:
        rows = [*self._train_rows(),
                _row("cnn_parameters", self._n_params(), "", None, "same CNN as he[mode=cnn]")]
        return [r for r in rows if r["value"] is not None]

    def teardown(self) -> None:
        pass


__all__ = ["HEBackend", "HECNNBackend", "HECNNPlaintextControl", "HEOptions", "MAX_COEFF_BITS_128"]
