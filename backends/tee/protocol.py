"""The simulated enclave's wire protocol: attestation reports, key schedule, sealed messages.

Both ends use this module, and it is part of the enclave's measured code (see
`tee_hardware.MEASURED_MODULES`): editing it changes the measurement.

Wire format (every message is one `send_bytes` blob; the first byte is its type):

    A | nonce[32]                         client -> enclave   attestation request
    R | report[272]                       enclave -> client   signed report (below)
    K | x25519_public[32]                 client -> enclave   client's ephemeral key share
    S | seq[8] | AES-GCM(ct || tag[16])   either way          sealed message
    X | reason (utf-8)                    enclave -> client   session aborted (no secrets)

Report (the simulated vendor's format, signed with the vendor's Ed25519 key):

    magic[16] | code_hash | model_hash | config_hash | measurement | report_data[64] | sig[64]

    measurement = SHA-256("tee-sim measurement v1" | code_hash | model_hash | config_hash)
    report_data = client nonce[32] | enclave ephemeral X25519 public key[32]

Key schedule: shared = X25519(ephemeral, ephemeral); transcript = SHA-256 over the
length-prefixed request, report message and key share; HKDF-SHA256(shared, salt=transcript,
info="tee-sim/v1 session keys") -> 64 bytes = client->enclave key | enclave->client key.
The enclave proves it derived the same keys by sealing the transcript hash (kind CONFIRM).

Sealed messages: AES-256-GCM under the direction's key, nonce = seq as 12 bytes big-endian
(keys are fresh per session, seq strictly increases, so nonces never repeat), associated
data = protocol id | direction | header ('S' | seq). The receiver accepts only the next seq:
a replayed, reordered or dropped message is rejected before decryption.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from typing import Any

PROTOCOL_ID = b"tee-sim/v1"
NONCE_BYTES = 32
KEY_BYTES = 32
TAG_BYTES = 16

# message types (first byte of every blob)
ATTEST_REQUEST = b"A"
REPORT = b"R"
KEY_SHARE = b"K"
SEALED = b"S"
ABORT = b"X"

# sealed message kinds (first byte of the sealed plaintext)
CONFIRM = b"c"    # enclave -> client: transcript hash (+ enclave info, JSON)
WEIGHTS = b"w"    # model owner -> enclave: serialised state dict
LOADED = b"l"     # enclave -> model owner: model digest and working-set figures (JSON)
BATCH = b"b"      # data owner -> enclave: images
RESULT = b"r"     # enclave -> data owner: probabilities and compute time
CLOSE = b"q"      # client -> enclave: shut down
BYE = b"z"        # enclave -> client: final counters (JSON), then the enclave exits
KIND_NAMES = {CONFIRM: "key confirmation", WEIGHTS: "weights", LOADED: "load receipt",
              BATCH: "image batch", RESULT: "result", CLOSE: "close", BYE: "goodbye"}

CLIENT_TO_ENCLAVE = b"c2e"
ENCLAVE_TO_CLIENT = b"e2c"

NO_MODEL = bytes(32)   # model_hash of an enclave that has not been given weights yet
REPORT_MAGIC = b"TEESIM-REPORT-v1"
_REPORT_BODY_BYTES = len(REPORT_MAGIC) + 4 * 32 + 64
REPORT_BYTES = _REPORT_BODY_BYTES + 64
_SIGN_DOMAIN = b"tee-sim/v1 attestation report\x00"


class TEEError(RuntimeError):
    """Base of every simulated-TEE failure; the message says what was rejected and why."""


class AttestationError(TEEError):
    """The enclave's report was forged, stale (replayed) or measures other code/model/config."""


class KeyAgreementError(TEEError):
    """The session keys of the two ends differ (substituted key share, tampered confirmation)."""


class ChannelIntegrityError(TEEError):
    """A sealed message failed authentication or arrived out of sequence (tamper/replay/reorder)."""


class EnclaveUnavailableError(TEEError):
    """The enclave process is gone or did not answer in time."""


class EnclaveRejectedError(TEEError):
    """The enclave aborted the session (it rejected something the client sent)."""


class ProtocolError(TEEError):
    """A malformed or unexpected message."""


# --- hashing helpers -------------------------------------------------------------------------

def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def _framed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def canonical_config(config: dict[str, Any]) -> bytes:
    """The exact bytes the simulated hardware measures as the enclave's configuration."""
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def code_digest(sources: dict[str, bytes]) -> bytes:
    """SHA-256 over the enclave modules' source, by module name, length-prefixed."""
    return sha256(*(_framed(name.encode(), sources[name]) for name in sorted(sources)))


@dataclass(frozen=True)
class Measurement:
    """The three measured components; `digest` is what a report carries and a client pins."""

    code_hash: bytes
    model_hash: bytes
    config_hash: bytes

    @property
    def digest(self) -> bytes:
        return sha256(b"tee-sim measurement v1", self.code_hash, self.model_hash, self.config_hash)

    def with_model(self, model_hash: bytes) -> "Measurement":
        return Measurement(self.code_hash, model_hash, self.config_hash)

    def differences(self, other: "Measurement") -> list[str]:
        return [name for name, a, b in (("code", self.code_hash, other.code_hash),
                                        ("model weights", self.model_hash, other.model_hash),
                                        ("configuration", self.config_hash, other.config_hash))
                if a != b]


# --- attestation reports ---------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    measured: Measurement
    measurement: bytes
    report_data: bytes
    signature: bytes = b""

    @property
    def nonce(self) -> bytes:
        return self.report_data[:NONCE_BYTES]

    @property
    def kex_public(self) -> bytes:
        return self.report_data[NONCE_BYTES:]

    def body(self) -> bytes:
        m = self.measured
        return (REPORT_MAGIC + m.code_hash + m.model_hash + m.config_hash + self.measurement
                + self.report_data)

    def to_bytes(self) -> bytes:
        return self.body() + self.signature

    @classmethod
    def parse(cls, data: bytes) -> "Report":
        if len(data) != REPORT_BYTES or not data.startswith(REPORT_MAGIC):
            raise AttestationError(f"malformed attestation report ({len(data)} bytes, "
                                   f"expected {REPORT_BYTES} starting with {REPORT_MAGIC!r})")
        fields = [data[len(REPORT_MAGIC) + 32 * i: len(REPORT_MAGIC) + 32 * (i + 1)] for i in range(4)]
        return cls(Measurement(*fields[:3]), fields[3],
                   data[_REPORT_BODY_BYTES - 64:_REPORT_BODY_BYTES], data[_REPORT_BODY_BYTES:])


def sign_report(measured: Measurement, report_data: bytes, vendor_key: Any) -> bytes:
    """What the simulated hardware does: fill in its measurement registers and sign."""
    if len(report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    report = Report(measured, measured.digest, report_data)
    return report.body() + vendor_key.sign(_SIGN_DOMAIN + report.body())


def verify_report(data: bytes, vendor_public: bytes, expected: Measurement, nonce: bytes) -> Report:
    """Check signature, freshness and measurement, in that order; raise AttestationError."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    report = Report.parse(data)
    try:
        Ed25519PublicKey.from_public_bytes(vendor_public).verify(report.signature,
                                                                 _SIGN_DOMAIN + report.body())
    except InvalidSignature:
        raise AttestationError("attestation report signature does not verify under the pinned "
                               "hardware-vendor key: forged report or wrong vendor key") from None
    if report.measurement != report.measured.digest:
        raise AttestationError("attestation report is inconsistent: its measurement is not the "
                               "hash of its code/model/config registers")
    if report.nonce != nonce:
        raise AttestationError(f"attestation report answers nonce {report.nonce.hex()[:16]}..., not "
                               f"the fresh nonce {nonce.hex()[:16]}... just sent: a replayed or "
                               "stale report")
    if report.measurement != expected.digest:
        raise AttestationError(
            f"enclave measurement {report.measurement.hex()[:16]}... differs from the pinned "
            f"{expected.digest.hex()[:16]}... (different "
            f"{', '.join(report.measured.differences(expected)) or 'registers'}): refusing to send")
    return report


# --- key schedule ----------------------------------------------------------------------------

def transcript_hash(*messages: bytes) -> bytes:
    return sha256(PROTOCOL_ID, b" transcript", _framed(*messages))


def session_keys(shared_secret: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client->enclave key, enclave->client key), bound to the attestation transcript."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=transcript,
               info=PROTOCOL_ID + b" session keys").derive(shared_secret)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def x25519_exchange(private_key: Any, peer_public: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:   # wrong length or a low-order point (all-zero secret)
        raise KeyAgreementError(f"unusable X25519 key share: {exc}") from None


def x25519_keypair() -> tuple[Any, bytes]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- sealed messages -------------------------------------------------------------------------

class Sealer:
    """One end of a session: seals outgoing, opens incoming, enforces the sequence.

    `seconds` accumulates the wall time spent inside AES-GCM per message kind (a
    crypto-component breakdown; the harness times everything else).
    """

    def __init__(self, send_key: bytes, recv_key: bytes, send_dir: bytes, recv_dir: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self._send_dir, self._recv_dir = send_dir, recv_dir
        self.send_seq = 0
        self.recv_seq = 0
        self.seconds: dict[bytes, float] = {}

    @classmethod
    def for_client(cls, keys: tuple[bytes, bytes]) -> "Sealer":
        return cls(keys[0], keys[1], CLIENT_TO_ENCLAVE, ENCLAVE_TO_CLIENT)

    @classmethod
    def for_enclave(cls, keys: tuple[bytes, bytes]) -> "Sealer":
        return cls(keys[1], keys[0], ENCLAVE_TO_CLIENT, CLIENT_TO_ENCLAVE)

    def seal(self, kind: bytes, payload: bytes) -> bytes:
        start = time.perf_counter()
        header = SEALED + struct.pack(">Q", self.send_seq)
        ct = self._send.encrypt(_nonce(self.send_seq), kind + payload,
                                PROTOCOL_ID + self._send_dir + header)
        self.send_seq += 1
        self._tick(kind, start)
        return header + ct

    def open(self, message: bytes) -> tuple[bytes, bytes]:
        from cryptography.exceptions import InvalidTag

        start = time.perf_counter()
        if message[:1] != SEALED or len(message) < 9 + TAG_BYTES + 1:
            raise ProtocolError(f"expected a sealed message, got type {message[:1]!r} "
                                f"({len(message)} bytes)")
        header = message[:9]
        (seq,) = struct.unpack(">Q", header[1:])
        if seq != self.recv_seq:
            raise ChannelIntegrityError(
                f"sealed message #{seq} arrived where #{self.recv_seq} was expected: "
                "replayed, reordered or dropped message rejected")
        try:
            plain = self._recv.decrypt(_nonce(seq), message[9:], PROTOCOL_ID + self._recv_dir + header)
        except InvalidTag:
            raise ChannelIntegrityError(
                f"sealed message #{seq} failed AES-GCM authentication: tampered in transit "
                "or sealed under a different key") from None
        self.recv_seq += 1
        kind = plain[:1]
        self._tick(kind, start)
        return kind, plain[1:]

    def _tick(self, kind: bytes, start: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


# --- payloads --------------------------------------------------------------------------------

_DTYPES = {b"f": "<f4", b"d": "<f8"}


def encode_array(array: Any) -> bytes:
    import numpy as np

    array = np.asarray(array)
    code = {np.dtype("<f4"): b"f", np.dtype("<f8"): b"d"}.get(array.dtype)
    if code is None:
        raise ProtocolError(f"cannot send arrays of dtype {array.dtype}")
    return (code + struct.pack(">B", array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            + np.ascontiguousarray(array).tobytes())


def decode_array(data: bytes) -> Any:
    import numpy as np

    if len(data) < 2 or data[:1] not in _DTYPES:
        raise ProtocolError("malformed array payload")
    ndim = data[1]
    shape = struct.unpack(f">{ndim}I", data[2:2 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[:1]])
    body = data[2 + 4 * ndim:]
    if len(body) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ProtocolError(f"array payload of {len(body)} bytes does not match shape {shape}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def encode_result(probs: Any, compute_s: float) -> bytes:
    return struct.pack(">d", compute_s) + encode_array(probs)


def decode_result(data: bytes) -> tuple[Any, float]:
    (compute_s,) = struct.unpack(">d", data[:8])
    return decode_array(data[8:]), compute_s
