"""The enclave's code: the only code that sees images and weights in the clear.

Measured at launch by the simulated hardware (`tee_hardware.MEASURED_MODULES`) and run
from the measured bytes. It answers one client session at a time over the host's
socket pair:

    attestation request -> signed report carrying the client's nonce and a fresh X25519 key
    key share           -> sealed key confirmation (the transcript hash)
    sealed WEIGHTS      -> load the model once, extend the model register, sealed receipt
    sealed BATCH        -> run the DenseNet, sealed probabilities
    sealed CLOSE        -> sealed counters, then exit

Anything rejected (bad signature material, tampered or replayed sealed message, a
message out of order) aborts the session with a plaintext reason that holds no data;
a new attestation request starts a new session. EOF on the channel (the host closed it
or died) ends the process.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from backends.tee import protocol as P


class _Session:
    def __init__(self) -> None:
        self.pending: tuple[Any, bytes, bytes] | None = None   # (x25519 key, request, report msg)
        self.sealer: P.Sealer | None = None
        self.images = 0
        self.batches = 0
        self.compute_s = 0.0


class Enclave:
    def __init__(self, cpu: Any, config: dict[str, Any]) -> None:
        self.cpu, self.config = cpu, config
        self.session = _Session()
        self.net = None
        self.torch = None

    def drop_session(self) -> None:
        self.session = _Session()

    def handle(self, message: bytes) -> tuple[bytes, bool]:
        """One request -> (reply, exit afterwards)."""
        kind = message[:1]
        if kind == P.ATTEST_REQUEST:
            return self._attest(message), False
        if kind == P.KEY_SHARE:
            return self._agree(message), False
        if kind == P.SEALED:
            return self._sealed(message)
        raise P.ProtocolError(f"unknown message type {kind!r}")

    def _attest(self, message: bytes) -> bytes:
        nonce = message[1:]
        if len(nonce) != P.NONCE_BYTES:
            raise P.ProtocolError(f"attestation nonce must be {P.NONCE_BYTES} bytes, got {len(nonce)}")
        self.drop_session()   # a new attestation request ends any previous session
        key, public = P.x25519_keypair()
        reply = P.REPORT + self.cpu.report(nonce + public)
        self.session.pending = (key, message, reply)
        return reply

    def _agree(self, message: bytes) -> bytes:
        if self.session.pending is None:
            raise P.ProtocolError("key share without a preceding attestation request")
        key, request, report = self.session.pending
        self.session.pending = None
        shared = P.x25519_exchange(key, message[1:])
        transcript = P.transcript_hash(request, report, message)
        self.session.sealer = P.Sealer.for_enclave(P.session_keys(shared, transcript))
        return self.session.sealer.seal(P.CONFIRM, transcript)

    def _sealed(self, message: bytes) -> tuple[bytes, bool]:
        sealer = self.session.sealer
        if sealer is None:
            raise P.ProtocolError("sealed message outside an established session")
        kind, payload = sealer.open(message)
        if kind == P.WEIGHTS:
            info = self._load(payload)
            return sealer.seal(P.LOADED, json.dumps(info).encode()), False
        if kind == P.BATCH:
            return sealer.seal(P.RESULT, self._infer(payload)), False
        if kind == P.CLOSE:
            s = self.session
            stats = {"images": s.images, "batches": s.batches, "compute_s": s.compute_s,
                     "open_batch_s": sealer.seconds.get(P.BATCH, 0.0),
                     "seal_result_s": sealer.seconds.get(P.RESULT, 0.0)}
            return sealer.seal(P.BYE, json.dumps(stats).encode()), True
        raise P.ProtocolError(f"unexpected sealed message kind {kind!r}")

    def _load(self, blob: bytes) -> dict[str, Any]:
        if self.net is not None:
            raise P.ProtocolError("weights were already provisioned; an enclave loads one model")
        _check_versions(self.config["versions"])
        import torch

        from suite.models import build_densenet

        torch.set_num_threads(int(self.config["threads"]))
        model = self.config["model"]
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        net = build_densenet(model["architecture"], len(model["pathologies"]))
        net.load_state_dict(state)
        self.net, self.torch = net.eval(), torch
        digest = P.sha256(blob)
        self.cpu.extend_model(digest)
        side = int(model["resolution"])
        return {"model_hash": digest.hex(),
                "param_bytes": sum(t.numel() * t.element_size() for t in state.values()),
                "input_bytes_per_image": side * side * 4,
                "activation_bytes_per_image": peak_activation_bytes(net, side)}

    def _infer(self, payload: bytes) -> bytes:
        if self.net is None:
            raise P.ProtocolError("no model loaded: the model owner has not provisioned weights")
        images = P.decode_array(payload)
        if images.ndim != 4 or images.shape[1] != 1 or images.dtype.itemsize != 4:
            raise P.ProtocolError(f"expected float32 images [B, 1, H, W], got {images.dtype} "
                                  f"{tuple(images.shape)}")
        torch = self.torch
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.net.classifier(self.net.features2(torch.from_numpy(images)))
            probs = torch.sigmoid(logits.double()).numpy()
        compute_s = time.perf_counter() - start
        s = self.session
        s.images += len(images)
        s.batches += 1
        s.compute_s += compute_s
        return P.encode_result(probs, compute_s)


def _check_versions(pinned: dict[str, str]) -> None:
    from importlib.metadata import version

    for dist, want in pinned.items():
        have = version(dist)
        if have != want:
            raise P.ProtocolError(f"enclave runtime has {dist} {have}, the measured "
                                  f"configuration pins {want}")


def peak_activation_bytes(net: Any, side: int) -> int:
    """Peak bytes of live tensors during one forward pass on one image (weights excluded).

    Every op's output storage is counted from creation until Python frees it, so the
    figure follows the model's real allocation order (DenseNet's concatenations included).
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.current = self.peak = 0

        def _free(self, key: int) -> None:
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.live:
                        self.live[key] = storage.nbytes()
                        self.current += storage.nbytes()
                        self.peak = max(self.peak, self.current)
                        weakref.finalize(t, self._free, key)
            return out

    tracker = LiveBytes()
    with torch.inference_mode(), tracker:
        net.classifier(net.features2(torch.zeros(1, 1, side, side)))
    return int(tracker.peak)


def serve(conn: Any, cpu: Any, config: dict[str, Any]) -> int:
    enclave = Enclave(cpu, config)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return 0   # the host closed the channel or died
        done = False
        try:
            reply, done = enclave.handle(message)
        except P.TEEError as exc:
            enclave.drop_session()
            reply = P.ABORT + str(exc).encode()
        except Exception as exc:  # noqa: BLE001 - report the failure's type, never the data
            enclave.drop_session()
            reply = P.ABORT + f"enclave error: {type(exc).__name__}: {exc}"[:400].encode()
        try:
            conn.send_bytes(reply)
        except OSError:
            return 0
        if done:
            return 0
