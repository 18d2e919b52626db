"""The simulated TEE: a sealed round trip through the enclave process, and its crypto parts."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from benchmarks._fixtures import batch, context, small_model, synthetic


class TEEPerImage:
    """Small DenseNet at 64 px, batch 32, sealed to a child enclave process and back."""

    timeout = 300

    def setup(self):
        from backends.tee import TEEBackend

        self.data = synthetic(n_per_site=5)
        self.backend = TEEBackend(TEEBackend.Options(batch_size=32))
        self.backend.setup(context(small_model(self.data.label_names), tempfile.mkdtemp()))
        self.x = batch(self.data, 32)

    def teardown(self):
        self.backend.teardown()

    def time_predict_batch32(self):
        self.backend.predict_proba(self.x)


class TEECrypto:
    """Crypto parts per session and per batch (224 px, batch 32 = 6.4 MB sealed each way)."""

    def setup(self):
        from backends.tee import protocol as P
        from backends.tee.hardware import SimulatedCPU, SimulatedVendor

        self.P = P
        vendor = SimulatedVendor.generate()
        self.vendor_public = vendor.public_bytes
        cpu = SimulatedCPU(vendor.fuse_into_cpu(), P.sha256(b"code"), P.sha256(b"config"))
        self.nonce = os.urandom(P.NONCE_BYTES)
        self.expected = P.Measurement(P.sha256(b"code"), P.NO_MODEL, P.sha256(b"config"))
        self.report = cpu.report(self.nonce + bytes(32))
        keys = (os.urandom(32), os.urandom(32))
        self.client, self.enclave = P.Sealer.for_client(keys), P.Sealer.for_enclave(keys)
        images = np.random.default_rng(0).normal(size=(32, 1, 224, 224)).astype(np.float32)
        self.payload = P.encode_array(images)
        self.sealed = self.client.seal(P.BATCH, self.payload)

    def time_verify_report(self):
        self.P.verify_report(self.report, self.vendor_public, self.expected, self.nonce)

    def time_key_agreement(self):
        a, _ = self.P.x25519_keypair()
        _, b_public = self.P.x25519_keypair()
        self.P.session_keys(self.P.x25519_exchange(a, b_public), bytes(32))

    def time_seal_batch32_224(self):
        self.client.seal(self.P.BATCH, self.payload)

    def time_open_batch32_224(self):
        self.enclave.recv_seq = 0
        self.enclave.open(self.sealed)
