"""Security properties of the simulated TEE backend, checked on the bytes that cross.

One enclave (a real `TEEBackend` on the tiny model) serves every test that needs a model;
each attack opens a fresh session on it through `Wire`, the host's view of the channel,
which records every blob and can tamper with it. A rejected session must leave nothing
sealed in what the client sent.
"""

from __future__ import annotations

import os
import signal
import time
import zlib

import numpy as np
import psutil
import pytest

pytest.importorskip("cryptography")

from backends.tee import protocol as P  # noqa: E402
from backends.tee.backend import TEEBackend, enclave_config, paging_penalty, profile_factor  # noqa: E402
from backends.tee.client import AttestedSession  # noqa: E402
from backends.tee.hardware import EnclaveProcess, SimulatedVendor, expected_code_hash  # noqa: E402
from suite.backend import BackendContext  # noqa: E402
from suite.meter import CommMeter  # noqa: E402


class Wire:
    """The untrusted host between a client and the enclave: records, and may rewrite, each blob."""

    def __init__(self, inner, on_send=None, on_recv=None):
        self.inner, self.on_send, self.on_recv = inner, on_send, on_recv
        self.sent: list[bytes] = []       # what the client handed to the host
        self.received: list[bytes] = []   # what the client got back

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.inner.send(self.on_send(data) if self.on_send else data)

    def recv(self, what: str) -> bytes:
        data = self.inner.recv(what)
        data = self.on_recv(data) if self.on_recv else data
        self.received.append(data)
        return data

    def blobs(self) -> list[bytes]:
        return self.sent + self.received

    def sealed_sent(self) -> list[bytes]:
        return [b for b in self.sent if b[:1] == P.SEALED]


def flip(blob: bytes, at: int = -20) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def only_when(kind: bytes, fn):
    return lambda blob: fn(blob) if blob[:1] == kind else blob


@pytest.fixture(scope="module")
def tee(tiny_model, tmp_path_factory):
    """A TEEBackend set up on the tiny model; its host channel is recorded."""
    wires = []

    def hook(channel):
        wires.append(Wire(channel))
        return wires[-1]

    backend = TEEBackend(TEEBackend.Options(batch_size=16, reply_timeout_s=300), channel_hook=hook)
    ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path_factory.mktemp("tee"),
                         threads=1)
    try:
        backend.setup(ctx)
        ctx.meter.set_phase("online")
        backend.wire, backend.ctx = wires[0], ctx
        yield backend
    finally:
        backend.teardown()


@pytest.fixture(scope="module")
def test_images(tiny_data):
    return tiny_data.split("test").images


def reference(model, images):
    import torch

    with torch.inference_mode():
        return torch.sigmoid(model.logits(torch.from_numpy(images)).double()).numpy()


def session(tee, wire, expected=None, vendor=None):
    return AttestedSession.open(wire, vendor or tee.vendor_public, expected or tee.expected)


def assert_nothing_sealed_sent(wire):
    assert wire.sealed_sent() == [], "the client sent sealed data after a rejection"
    assert all(b[:1] in (P.ATTEST_REQUEST, P.KEY_SHARE) for b in wire.sent)


# --- the working path ----------------------------------------------------------------------------

def test_backend_matches_plaintext_and_only_ciphertext_crosses(tee, tiny_model, test_images):
    batches = [test_images[i:i + 16] for i in range(0, len(test_images), 16)]
    probs = np.concatenate([tee.predict_proba(x) for x in batches])
    expect = np.concatenate([reference(tiny_model, x) for x in batches])
    assert np.abs(probs - expect).max() <= TEEBackend.tolerance

    blobs = tee.wire.blobs()
    crossed = b"|".join(blobs)   # one haystack: a match across two blobs would only be stricter
    # images: whole, and 64-byte windows of every image at several offsets, never in the clear
    for image in test_images:
        raw = image.tobytes()
        assert raw not in crossed
        for o in (0, len(raw) // 3, len(raw) // 2, len(raw) - 64):
            assert raw[o:o + 64] not in crossed
    # the model owner's weights: never in the clear either
    state = tiny_model.net.state_dict()
    for name in ("features.conv0.weight", "classifier.weight"):
        assert state[name].numpy().tobytes()[:64] not in crossed, f"{name} crossed in the clear"

    # ciphertexts look random: incompressible and a flat byte histogram
    sealed = b"".join(b[9:] for b in tee.wire.sealed_sent())
    raw_images = test_images.tobytes()
    assert len(zlib.compress(raw_images, 9)) / len(raw_images) < 0.9   # the plaintext is not
    assert len(zlib.compress(sealed, 9)) / len(sealed) > 0.99
    counts = np.bincount(np.frombuffer(sealed, dtype=np.uint8), minlength=256)
    expected = len(sealed) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 8 * np.sqrt(2 * 255), f"byte histogram of ciphertext is not flat: chi2 {chi2:.0f}"

    online = tee.ctx.meter.totals("online")
    assert online.rounds == len(batches) and online.messages == 2 * len(batches)
    last = tee.wire.sent[-len(batches):] + tee.wire.received[-len(batches):]
    assert online.bytes_sent == sum(len(b) for b in last)


def test_extra_rows_are_labelled(tee):
    rows = {r["metric"]: r for r in tee.extra_rows()}
    assert set(rows) == {"simulated_enclave_latency_per_image", "native_compute_per_image",
                         "crypto_overhead_per_image", "attestation_time", "key_agreement_time",
                         "epc_working_set_bytes", "tee_profile_factor"}
    for metric in ("simulated_enclave_latency_per_image", "tee_profile_factor"):
        assert "simulated" in rows[metric]["note"] and "cvm" in rows[metric]["note"]
    assert rows["tee_profile_factor"]["value"] == pytest.approx(1.15)
    assert all(r["value"] > 0 for r in rows.values())
    assert "simulated" in " ".join(tee.threat_model().guarantee.lower().split())
    assert tee.threat_model().simulated


def test_paging_penalty_is_anchored():
    assert paging_penalty(50e6, 93e6, 26) == 1.0
    assert paging_penalty(93e6 * 1000, 93e6, 26) == pytest.approx(26, rel=1e-2)
    assert paging_penalty(2 * 93e6, 93e6, 2) == pytest.approx(1.5)
    opts = TEEBackend.Options(profile="sgx", sgx_partitioned=True)
    assert profile_factor(opts, 10 * 93e6)[0] == pytest.approx(1.9)
    assert profile_factor(TEEBackend.Options(profile="native"), 1e12)[0] == 1.0


# --- attestation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("component", ["code", "model weights", "configuration"])
def test_wrong_measurement_is_rejected_before_anything_is_sent(tee, component):
    e = tee.expected
    wrong = {"code": P.Measurement(P.sha256(b"patched enclave"), e.model_hash, e.config_hash),
             "model weights": e.with_model(P.sha256(b"the host's own weights")),
             "configuration": P.Measurement(e.code_hash, e.model_hash, P.sha256(b"{}"))}[component]
    wire = Wire(tee.enclave.channel)
    with pytest.raises(P.AttestationError, match=f"differs from the pinned.*{component}"):
        session(tee, wire, expected=wrong)
    assert wire.sent == wire.sent[:1] and wire.sent[0][:1] == P.ATTEST_REQUEST
    assert_nothing_sealed_sent(wire)


def test_report_signed_by_another_vendor_key_is_rejected(tee):
    wire = Wire(tee.enclave.channel)
    with pytest.raises(P.AttestationError, match="does not verify under the pinned"):
        session(tee, wire, vendor=SimulatedVendor.generate().public_bytes)
    assert len(wire.sent) == 1
    assert_nothing_sealed_sent(wire)


def test_replayed_report_is_rejected(tee):
    first = Wire(tee.enclave.channel)
    session(tee, first)
    old_report = first.received[0]
    wire = Wire(tee.enclave.channel, on_recv=only_when(P.REPORT, lambda _: old_report))
    with pytest.raises(P.AttestationError, match="replayed or stale"):
        session(tee, wire)
    assert len(wire.sent) == 1
    assert_nothing_sealed_sent(wire)


# --- key agreement -------------------------------------------------------------------------------

def test_substituted_key_share_gives_wrong_keys_and_is_rejected(tee):
    _, attacker_public = P.x25519_keypair()
    wire = Wire(tee.enclave.channel, on_send=only_when(P.KEY_SHARE, lambda _: P.KEY_SHARE + attacker_public))
    with pytest.raises(P.KeyAgreementError, match="other session keys"):
        session(tee, wire)
    assert_nothing_sealed_sent(wire)


def test_tampered_key_confirmation_is_rejected(tee):
    wire = Wire(tee.enclave.channel, on_recv=only_when(P.SEALED, flip))
    with pytest.raises(P.KeyAgreementError, match="AES-GCM authentication"):
        session(tee, wire)
    assert_nothing_sealed_sent(wire)


# --- sealed traffic ------------------------------------------------------------------------------

def test_tampered_batch_is_rejected_by_the_enclave(tee, test_images):
    wire = Wire(tee.enclave.channel, on_send=only_when(P.SEALED, flip))
    s = session(tee, wire)
    with pytest.raises(P.EnclaveRejectedError, match="failed AES-GCM authentication"):
        s.infer(test_images[:2])
    sent = len(wire.sent)
    with pytest.raises(P.TEEError, match="unusable after an earlier failure"):
        s.infer(test_images[2:4])
    assert len(wire.sent) == sent, "a failed session sent more"


def test_tampered_result_is_rejected(tee, test_images):
    wire = Wire(tee.enclave.channel)
    s = session(tee, wire)
    wire.on_recv = only_when(P.SEALED, flip)
    with pytest.raises(P.ChannelIntegrityError, match="failed AES-GCM authentication"):
        s.infer(test_images[:2])


def test_replayed_batch_is_rejected_by_the_enclave(tee, test_images):
    wire = Wire(tee.enclave.channel)
    s = session(tee, wire)
    s.infer(test_images[:2])
    first_batch = wire.sealed_sent()[0]
    wire.on_send = only_when(P.SEALED, lambda _: first_batch)
    with pytest.raises(P.EnclaveRejectedError, match="#0 arrived where #1 was expected"):
        s.infer(test_images[2:4])


def test_reordered_result_is_rejected(tee, test_images):
    wire = Wire(tee.enclave.channel)
    s = session(tee, wire)
    s.infer(test_images[:2])
    old_result = wire.received[-1]
    wire.on_recv = only_when(P.SEALED, lambda _: old_result)
    with pytest.raises(P.ChannelIntegrityError, match="#1 arrived where #2 was expected"):
        s.infer(test_images[2:4])


# --- process lifecycle ---------------------------------------------------------------------------

@pytest.fixture
def bare_enclave(tiny_model):
    """An enclave with no model (it never imports torch): cheap to start and to kill."""
    vendor = SimulatedVendor.generate()
    config = enclave_config(tiny_model, 1)
    # a start-up as slow as a loaded machine makes it, then the 1 s limit the tests below check
    enclave = EnclaveProcess.launch(vendor, config, reply_timeout_s=60.0)
    launch = P.Measurement(expected_code_hash(), P.NO_MODEL, P.sha256(P.canonical_config(config)))
    try:                         # a failed attestation must not leave the enclave to later tests
        session = AttestedSession.open(enclave.channel, vendor.public_bytes, launch)
    except BaseException:
        enclave.stop(grace_s=1.0)
        raise
    enclave.channel.reply_timeout_s = 1.0
    yield enclave, session
    enclave.stop(grace_s=1.0)
    assert not enclave.alive()


def test_killed_enclave_fails_fast_with_a_clear_error(bare_enclave, test_images):
    enclave, s = bare_enclave
    os.kill(enclave.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(P.EnclaveUnavailableError, match="killed or crashed"):
        s.infer(test_images[:2])
    assert time.monotonic() - start < 3.0


def test_hung_enclave_times_out(bare_enclave, test_images):
    enclave, s = bare_enclave
    os.kill(enclave.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(P.EnclaveUnavailableError, match="within 1 s"):
            s.infer(test_images[:2])
        assert time.monotonic() - start < 3.0
    finally:
        os.kill(enclave.pid, signal.SIGCONT)


def test_teardown_is_safe_before_setup():
    TEEBackend().teardown()


def test_bad_profile_is_named():
    from suite.errors import SuiteError

    with pytest.raises(SuiteError, match="did you mean 'sgx'"):
        TEEBackend(TEEBackend.Options(profile="sgz"))


def test_teardown_stops_the_enclave(tee):
    """Last: the shared enclave's clean shutdown (its own session was superseded by the attacks)."""
    pid = tee.enclave.pid
    tee.teardown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not tee.enclave.alive()
    tee.teardown()   # twice is fine
