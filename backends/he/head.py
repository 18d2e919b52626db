"""`he` mode `head`: the model owner's classifier head evaluated on CKKS ciphertexts.

Parties and what each holds:
  data owner (hospital)  images, the DenseNet feature extractor (disclosed to it), the
                         CKKS secret key; sees features, logits and probabilities.
  model owner (vendor)   the classifier head (Linear F -> L) and a public CKKS context
                         (public key only: no secret, Galois or relinearisation keys).

Packing, feature-major: ciphertext j carries feature j of every image in the batch, one
image per slot (up to N/2 images per ciphertext; 2048 at N=4096). The head is then
    logit_l = sum_j W[l, j] * ct_j + b_l
computed with plaintext scalars only: F*L scalar multiplications, no rotations, one
rescaling level. A batch of B <= N/2 images costs F ciphertexts up and L down, whatever B.
Empty slots repeat the batch (TenSEAL replicates short vectors), so the returned
ciphertexts hold nothing but the batch's logits.
"""

from __future__ import annotations

import numpy as np

from backends.he.params import (CKKSParams, key_sizes, pack_message, private_context,
                                public_context_bytes, receive_public_context, unpack_message)


class HeadDataOwner:
    """Holds the secret key; encrypts pooled features, decrypts logits."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.ctx = private_context(params, galois=False)

    def public_context(self) -> bytes:
        return public_context_bytes(self.ctx, galois=False, relin=False)

    def key_sizes(self) -> dict[str, int]:
        return key_sizes(self.ctx, galois=False, relin=False)

    def encrypt(self, features: np.ndarray) -> list[bytes]:
        """features [B, F] (B <= slots) -> F serialised ciphertexts, one per feature."""
        import tenseal as ts

        if len(features) > self.params.slots:
            raise ValueError(f"{len(features)} images exceed {self.params.slots} slots")
        feats = np.asarray(features, dtype=np.float64)
        return [ts.ckks_vector(self.ctx, feats[:, j].tolist()).serialize()
                for j in range(feats.shape[1])]

    def decrypt(self, blobs: list[bytes], n_images: int) -> np.ndarray:
        """L serialised ciphertexts -> logits [B, L]."""
        import tenseal as ts

        cols = [np.asarray(ts.ckks_vector_from(self.ctx, b).decrypt()[:n_images]) for b in blobs]
        return np.stack(cols, axis=1)

    def request(self, features: np.ndarray) -> bytes:
        return pack_message(self.encrypt(features))

    def open_response(self, message: bytes, n_images: int) -> np.ndarray:
        return self.decrypt(unpack_message(message), n_images)


class HeadModelOwner:
    """Holds the head's weights and only a public context; computes on ciphertexts."""

    def __init__(self, public_context: bytes, weight: np.ndarray, bias: np.ndarray) -> None:
        self.ctx = receive_public_context(public_context)
        self.weight = np.asarray(weight, dtype=np.float64)   # [L, F]
        self.bias = np.asarray(bias, dtype=np.float64)       # [L]

    def evaluate(self, blobs: list[bytes]) -> list[bytes]:
        import tenseal as ts

        if len(blobs) != self.weight.shape[1]:
            raise ValueError(f"expected {self.weight.shape[1]} feature ciphertexts, got {len(blobs)}")
        cts = [ts.ckks_vector_from(self.ctx, b) for b in blobs]
        out = []
        for w_row, b in zip(self.weight, self.bias):
            acc = None
            for ct, w in zip(cts, w_row):
                if w == 0.0:
                    continue   # SEAL refuses a product that is exactly zero (transparent)
                term = ct * float(w)
                acc = term if acc is None else acc + term
            if acc is None:    # an all-zero row: a tiny weight keeps the ciphertext valid
                acc = cts[0] * 2.0 ** -30
            acc = acc + float(b)
            out.append(acc.serialize())
        return out

    def handle(self, message: bytes) -> bytes:
        return pack_message(self.evaluate(unpack_message(message)))
