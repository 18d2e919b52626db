"""The `he` backend: key separation, what ciphertexts reveal, parameter security, fidelity.

Fast (well under 90 s on two cores): one N=8192 key set for the CNN tests, a handful of
encrypted images, untrained tiny models.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from backends.he import HEBackend  # noqa: E402
from backends.he.params import (CNN_DEFAULT, HEAD_DEFAULT, MAX_COEFF_BITS_128, CKKSParams,  # noqa: E402
                                pack_message, unpack_message)
from suite.backend import BackendContext  # noqa: E402
from suite.errors import SuiteError  # noqa: E402
from suite.harness import measure  # noqa: E402
from suite.meter import CommMeter  # noqa: E402

# What the CNN tests promise: encrypted vs plaintext HE-friendly CNN, same weights and images.
CNN_LOGIT_TOL = 1e-3
CNN_PROB_TOL = 2.5e-4
HEAD_PROB_TOL = 1e-3          # the backend's declared tolerance


def _backend(**options):
    raw = {k: str(v) for k, v in options.items()}
    return HEBackend.create(HEBackend.Options.parse(raw, "he"))


def _ctx(model, quick=True):
    return BackendContext(model=model, meter=CommMeter(), workdir=Path(tempfile.mkdtemp()), seed=0,
                          threads=2, quick=quick)


@pytest.fixture(scope="module")
def cnn_owner():
    from backends.he.cnn import CNNDataOwner

    return CNNDataOwner(CNN_DEFAULT)


@pytest.fixture(scope="module")
def random_cnn():
    """An untrained HE-friendly CNN with non-trivial batch-norm statistics, logits of order 1."""
    import torch

    from backends.he.cnn import CNNSpec, DeployedCNN, build_net

    torch.manual_seed(1)
    net = build_net(CNNSpec(channels=4, pool=2), 3).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.fc.weight.mul_(4.0)
    return net, DeployedCNN.from_net(net)


@pytest.fixture(scope="module")
def calibrated_model(tiny_model, tiny_data):
    """tiny_model with its head rescaled so logits have sd ~2: probabilities away from 0 and 1,
    where CKKS noise would show (the untrained model's logits saturate the sigmoid)."""
    import torch

    bundle = copy.copy(tiny_model)
    bundle.net = copy.deepcopy(tiny_model.net)
    with torch.no_grad():
        x = torch.from_numpy(tiny_data.split("test").images)
        logits = bundle.logits(x)
        bundle.net.classifier.weight.mul_(2.0 / logits.std())
        bundle.net.classifier.bias.zero_()
    return bundle


def _images(n, rng, side=28):
    """Images with very different mean intensities, in [-1, 1]."""
    levels = np.linspace(-0.9, 0.9, n)
    rng.shuffle(levels)
    return np.clip(levels[:, None, None] + rng.normal(0, 0.05, (n, side, side)), -1, 1)


# ------------------------------------------------------------------ keys

def test_model_owner_context_has_no_secret_key(cnn_owner, random_cnn):
    from backends.he.cnn import CNNModelOwner
    from backends.he.head import HeadDataOwner, HeadModelOwner

    head_owner = HeadDataOwner(HEAD_DEFAULT)
    head_server = HeadModelOwner(head_owner.public_context(), np.ones((2, 3)), np.zeros(2))
    cnn_server = CNNModelOwner(cnn_owner.public_context(), random_cnn[1])
    for owner, server, blob in ((head_owner, head_server, head_owner.encrypt(np.ones((4, 3)))[0]),
                                (cnn_owner, cnn_server, cnn_owner.encrypt(np.zeros((28, 28))))):
        assert owner.ctx.is_private()
        assert not server.ctx.is_private()
        assert server.ctx.is_public()
        with pytest.raises(ValueError, match="secret"):
            ts.ckks_vector_from(server.ctx, blob).decrypt()
        # the data owner, holding the key, can
        assert len(ts.ckks_vector_from(owner.ctx, blob).decrypt()) > 0
    # head mode ships neither rotation nor relinearisation keys
    sizes = head_owner.key_sizes()
    assert sizes["galois_keys_bytes"] == 0 and sizes["relin_keys_bytes"] == 0
    assert len(head_owner.public_context()) < sizes["public_key_bytes"] + 1024


# ------------------------------------------------------------------ what ciphertexts reveal

def test_ciphertexts_differ_and_hide_pixel_statistics(cnn_owner):
    rng = np.random.default_rng(0)
    images = _images(32, rng)
    blobs = [cnn_owner.encrypt(img) for img in images]
    assert len(set(blobs)) == len(blobs)
    # probabilistic encryption: the same image twice gives different ciphertexts
    assert cnn_owner.encrypt(images[0]) != blobs[0]

    means = images.reshape(len(images), -1).mean(axis=1)
    stats = {"byte mean": [], "byte sd": [], "length": []}
    for b in blobs:
        a = np.frombuffer(b, dtype=np.uint8)
        stats["byte mean"].append(a.mean())
        stats["byte sd"].append(a.std())
        stats["length"].append(len(b))
    for name, values in stats.items():
        r = np.corrcoef(means, values)[0, 1]
        # |r| of unrelated series has sd ~ 1/sqrt(31) = 0.18; a leak gives |r| near 1
        assert abs(r) < 0.6, f"ciphertext {name} correlates with image mean (r={r:.2f})"

    # bytes look uniform: entropy near 8 bits/byte, every value within a factor of 2.5 of 1/256
    a = np.frombuffer(blobs[0], dtype=np.uint8)
    freq = np.bincount(a, minlength=256) / len(a)
    entropy = -(freq * np.log2(freq)).sum()
    assert entropy > 7.95, entropy
    assert freq.min() > 0.4 / 256 and freq.max() < 2.5 / 256
    # the same test on the image's own bytes fails: it has power
    raw = np.frombuffer(images[0].astype(np.float64).tobytes(), dtype=np.uint8)
    f_raw = np.bincount(raw, minlength=256) / len(raw)
    assert -(f_raw[f_raw > 0] * np.log2(f_raw[f_raw > 0])).sum() < 7.5


# ------------------------------------------------------------------ parameter security

def test_insecure_parameters_are_rejected_unless_allowed():
    with pytest.raises(SuiteError, match=r"insecure.*exceeds 109 bits.*allow_insecure=true"):
        _backend(coeff_mod_bit_sizes="60/40/40")
    with pytest.raises(SuiteError, match="insecure"):
        _backend(mode="cnn", poly_modulus_degree=8192, coeff_mod_bit_sizes="60/40/40/40/40/60")
    with pytest.raises(SuiteError, match="power of two"):
        _backend(poly_modulus_degree=3000)
    with pytest.raises(SuiteError, match="needs 4 rescaling"):
        _backend(mode="cnn", coeff_mod_bit_sizes="60/40/60")
    with pytest.raises(SuiteError, match="mode must be one of"):
        _backend(mode="tail")

    allowed = _backend(coeff_mod_bit_sizes="60/40/40", scale_bits=40, allow_insecure=True)
    assert not allowed.params.is_secure()
    assert "BELOW 128-bit" in allowed.threat_model().guarantee
    rows = {r["metric"]: r for r in allowed.extra_rows()}
    assert rows["ckks_security_bits"]["value"] == 0 and "INSECURE" in rows["ckks_security_bits"]["note"]

    # defaults are inside the standard's table
    for params in (HEAD_DEFAULT, CNN_DEFAULT):
        assert params.total_bits <= MAX_COEFF_BITS_128[params.poly_modulus_degree]
    assert CKKSParams(4096, (52, 36, 21), 36).is_secure()
    assert not CKKSParams(4096, (52, 36, 22), 36).is_secure()


def test_insecure_parameters_fail_at_planning():
    from suite.config import RunConfig
    from suite.planning import plan_backends

    with pytest.raises(SuiteError, match="insecure"):
        plan_backends(RunConfig(backends=["he:poly_modulus_degree=2048:coeff_mod_bit_sizes=30/30/30"]))


# ------------------------------------------------------------------ fidelity

def test_head_matches_plaintext_within_tolerance(calibrated_model, tiny_data):
    import torch

    backend = _backend(batch_size=24)
    ctx = _ctx(calibrated_model)
    test = tiny_data.split("test")
    probs, timings, _ = measure(backend, ctx, test, None, progress=False)
    with torch.inference_mode():
        ref = torch.sigmoid(calibrated_model.logits(torch.from_numpy(test.images)).double()).numpy()
    assert 0.05 < ref.mean() < 0.95 and ref.std() > 0.1    # probabilities are not saturated
    diff = np.abs(probs - ref).max()
    assert diff < HEAD_PROB_TOL, diff
    assert timings.batch_sizes == [24, len(test) - 24]
    rows = {r["metric"]: r["value"] for r in backend.extra_rows()}
    assert "encryption_max_abs_diff" not in rows, "plaintext comparisons belong to evaluation"
    assert rows["he_images_per_ciphertext"] == 24
    f, n_labels = calibrated_model.net.classifier.in_features, len(tiny_data.label_names)
    assert rows["he_ciphertexts_up"] == 2 * f and rows["he_ciphertexts_down"] == 2 * n_labels
    online = ctx.meter.totals("online")
    assert online.bytes_sent == rows["he_upload_bytes_per_image"] * len(test) + \
        rows["he_download_bytes_per_image"] * len(test)
    setup = ctx.meter.totals("setup")
    assert setup.bytes_sent == rows["public_context_bytes"] + rows["feature_extractor_bytes"]


def test_deployed_cnn_folds_batchnorm_and_pooling():
    import torch

    from backends.he.cnn import CNNSpec, DeployedCNN, build_net, preprocess

    x = preprocess(np.random.default_rng(2).uniform(-1024, 1024, (3, 1, 64, 64)).astype(np.float32))
    for pool in (1, 2, 4):
        torch.manual_seed(pool)
        net = build_net(CNNSpec(channels=3, pool=pool), 2).eval()
        with torch.no_grad():
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
            ref = net(x).double().numpy()
        assert np.abs(DeployedCNN.from_net(net).logits(x.numpy()) - ref).max() < 1e-4


def test_encrypted_cnn_matches_plaintext_cnn(cnn_owner, random_cnn):
    from backends.he.cnn import CNNModelOwner

    net, deployed = random_cnn
    server = CNNModelOwner(cnn_owner.public_context(), deployed)
    x = _images(2, np.random.default_rng(3))[:, None]
    response = server.handle(cnn_owner.request(x))
    logits = cnn_owner.open_response(response, 3)
    ref = deployed.logits(x)
    assert np.abs(ref).max() > 0.5                       # logits are not trivially small
    assert np.abs(logits - ref).max() < CNN_LOGIT_TOL
    p, p_ref = 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-ref))
    assert np.abs(p - p_ref).max() < CNN_PROB_TOL
    # every returned ciphertext holds its logit in slot 0 and (up to CKKS noise) zero in all
    # other 4095 slots: the partial sums the rotations leave behind are masked away
    for blob, logit in zip(unpack_message(response), logits.reshape(-1)):
        slots = _all_slots(cnn_owner.ctx, blob)
        assert len(slots) == CNN_DEFAULT.slots
        assert abs(slots[0] - logit) < 1e-9
        assert np.abs(slots[1:]).max() < 1e-4


def _all_slots(private_ctx, blob: bytes) -> np.ndarray:
    """Decode every slot of a serialised CKKSVector (TenSEAL's decrypt returns only `size`)."""
    from tenseal import sealapi

    seal_ctx = private_ctx.seal_context().data
    pt = sealapi.Plaintext()
    sealapi.Decryptor(seal_ctx, private_ctx.secret_key().data).decrypt(
        ts.ckks_vector_from(private_ctx, blob).ciphertext()[0], pt)
    return np.array(sealapi.CKKSEncoder(seal_ctx).decode_double(pt))


def test_cnn_backend_end_to_end(tiny_data, tiny_model):
    backend = _backend(mode="cnn", max_images=2, cnn_epochs=2, cnn_channels=2)
    assert type(backend).__name__ == "HECNNBackend"
    assert backend.track == "training" and backend.tolerance is None
    assert backend.config_label() == "he[cnn_channels=2,cnn_epochs=2,max_images=2,mode=cnn]"
    control = backend.reference()
    assert control.config_label() == "he[cnn_channels=2,cnn_epochs=2,max_images=2,mode=cnn-plaintext]"
    assert control.reference() == "plaintext" and control.threat_model().protects == ()
    assert backend.threat_model().protected_scope == "whole HE-friendly CNN (not the DenseNet)"

    ctx = _ctx(tiny_model)
    test = tiny_data.split("test").subset(np.arange(2))
    probs, _, _ = measure(backend, ctx, test, tiny_data.split("train"), progress=False)
    assert probs.shape == (2, len(tiny_data.label_names))
    rows = {r["metric"]: r["value"] for r in backend.extra_rows()}
    assert rows["he_images_per_ciphertext"] == 1
    assert rows["galois_keys_bytes"] > 0 and rows["relin_keys_bytes"] > 0
    assert ctx.meter.totals("online").bytes_sent > 0

    ctx2 = _ctx(tiny_model)
    plain, _, _ = measure(control, ctx2, test, tiny_data.split("train"), progress=False)
    assert np.abs(plain - probs).max() < CNN_PROB_TOL     # same weights: training is deterministic


def test_planning_schedules_the_cnn_control_first():
    from suite.config import RunConfig
    from suite.planning import plan_backends

    plans = {p.backend_id: p for p in plan_backends(RunConfig(backends=["he", "he:mode=cnn"]))}
    assert list(plans) == ["plaintext", "he", "he[mode=cnn-plaintext]", "he[mode=cnn]"]
    assert plans["he"].track == "inference" and plans["he"].reference == "plaintext"
    assert plans["he[mode=cnn-plaintext]"].reference == "plaintext"
    assert plans["he[mode=cnn]"].reference == "he[mode=cnn-plaintext]"
    assert plans["he[mode=cnn]"].track == "training"
    # the encrypted CNN scores a stratified prefix; its cheap control scores every image
    assert plans["he[mode=cnn]"].max_images == 140 and plans["he[mode=cnn-plaintext]"].max_images is None


def test_message_framing_round_trip():
    parts = [b"", b"a", bytes(range(256)) * 3]
    assert unpack_message(pack_message(parts)) == parts
    with pytest.raises(ValueError):
        unpack_message(pack_message(parts) + b"x")


def test_context_as_sent_holds_no_secret_key(cnn_owner):
    """Issue 19: check the bytes that go to the model owner, not an object made public in place."""
    from backends.he.head import HeadDataOwner

    for owner in (HeadDataOwner(HEAD_DEFAULT), cnn_owner):
        sent = owner.public_context()
        assert not ts.context_from(sent).is_private()
        # positive control: the same context serialised with its secret key is caught
        leaked = owner.ctx.serialize(save_public_key=True, save_secret_key=True)
        assert ts.context_from(leaked).is_private()


def test_head_mode_reports_its_real_mac_fraction(tiny_model):
    from backends.he.coverage import head_mac_fraction, layer_macs

    macs = layer_macs(tiny_model.net, tiny_model.resolution)
    fraction = head_mac_fraction(tiny_model.net, tiny_model.resolution)
    assert 0 < fraction < 0.01                    # one Linear layer of a DenseNet
    head = [m for n, m in macs if n == "classifier"][0]
    assert head == tiny_model.net.classifier.in_features * tiny_model.net.classifier.out_features
