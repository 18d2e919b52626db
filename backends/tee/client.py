"""The client end of an enclave session, used by the data owner and by the model owner.

`AttestedSession.open` sends a fresh nonce, verifies the signed report (vendor key,
nonce, pinned measurement) before sending anything else, then agrees session keys and
checks the enclave's key confirmation. Only then can sealed requests flow. Any failure
leaves the session unusable, so nothing is sent after a rejection.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.tee import protocol as P

RoundHook = Callable[[int, int], None]   # (bytes sent, bytes received) per request/response


class AttestedSession:
    def __init__(self, channel: Any, sealer: P.Sealer, report: P.Report, on_round: RoundHook | None,
                 attestation_s: float, key_agreement_s: float) -> None:
        self.channel, self.sealer, self.report = channel, sealer, report
        self.on_round = on_round
        self.attestation_s, self.key_agreement_s = attestation_s, key_agreement_s
        self.failed: BaseException | None = None
        self.closed = False
        self.images = 0
        self.online_crypto_s = 0.0    # this end's AES-GCM time on batches and results
        self.compute_s = 0.0          # the enclave's forward-pass time, from its sealed results

    @classmethod
    def open(cls, channel: Any, vendor_public: bytes, expected: P.Measurement,
             on_round: RoundHook | None = None) -> "AttestedSession":
        start = time.perf_counter()
        nonce = os.urandom(P.NONCE_BYTES)
        request = P.ATTEST_REQUEST + nonce
        reply = _round(channel, request, "attestation report", on_round)
        if reply[:1] != P.REPORT:
            raise P.ProtocolError(f"expected an attestation report, got message type {reply[:1]!r}")
        report = P.verify_report(reply[1:], vendor_public, expected, nonce)
        attestation_s = time.perf_counter() - start

        start = time.perf_counter()
        key, public = P.x25519_keypair()
        share = P.KEY_SHARE + public
        transcript = P.transcript_hash(request, reply, share)
        sealer = P.Sealer.for_client(P.session_keys(P.x25519_exchange(key, report.kex_public),
                                                    transcript))
        confirm = _round(channel, share, "key confirmation", on_round)
        try:
            kind, payload = sealer.open(confirm)
        except P.TEEError as exc:
            raise P.KeyAgreementError(f"key confirmation rejected, the enclave holds other session "
                                      f"keys (substituted key share or tampering): {exc}") from None
        if kind != P.CONFIRM or payload != transcript:
            raise P.KeyAgreementError("key confirmation does not match this session's transcript")
        return cls(channel, sealer, report, on_round, attestation_s, time.perf_counter() - start)

    # --- sealed requests ---------------------------------------------------------------------

    def request(self, kind: bytes, payload: bytes, expect: bytes) -> bytes:
        if self.failed is not None:
            raise P.TEEError(f"session is unusable after an earlier failure: {self.failed}")
        if self.closed:
            raise P.TEEError("session is closed")
        try:
            reply = _round(self.channel, self.sealer.seal(kind, payload),
                           P.KIND_NAMES[expect], self.on_round)
            got, body = self.sealer.open(reply)
            if got != expect:
                raise P.ProtocolError(f"expected a sealed {P.KIND_NAMES[expect]}, got kind {got!r}")
            return body
        except BaseException as exc:
            self.failed = exc
            raise

    def provision(self, weights: bytes) -> dict[str, Any]:
        """Model owner: send the serialised weights sealed; returns the enclave's receipt."""
        info = json.loads(self.request(P.WEIGHTS, weights, P.LOADED))
        if info.get("model_hash") != P.sha256(weights).hex():
            self.failed = P.TEEError("enclave loaded other weights than were sent")
            raise self.failed
        return info

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Data owner: one sealed batch out, one sealed result back."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        before = self.sealer.seconds.get(P.BATCH, 0.0) + self.sealer.seconds.get(P.RESULT, 0.0)
        probs, compute_s = P.decode_result(self.request(P.BATCH, P.encode_array(images), P.RESULT))
        after = self.sealer.seconds.get(P.BATCH, 0.0) + self.sealer.seconds.get(P.RESULT, 0.0)
        if probs.shape[0] != len(images):
            self.failed = P.ProtocolError(f"result for {probs.shape[0]} images, sent {len(images)}")
            raise self.failed
        self.online_crypto_s += after - before
        self.compute_s += compute_s
        self.images += len(images)
        return probs

    def close(self) -> dict[str, Any]:
        """Ask the enclave to shut down; returns its counters for this session."""
        stats = json.loads(self.request(P.CLOSE, b"", P.BYE))
        self.closed = True
        return stats


def _round(channel: Any, message: bytes, what: str, on_round: RoundHook | None) -> bytes:
    channel.send(message)
    reply = channel.recv(what)
    if on_round is not None:
        on_round(len(message), len(reply))
    if reply[:1] == P.ABORT:
        raise P.EnclaveRejectedError(f"enclave aborted the session instead of sending the {what}: "
                                     f"{reply[1:].decode(errors='replace')}")
    return reply
