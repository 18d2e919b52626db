"""`he` mode `cnn`: a compact HE-friendly CNN evaluated end to end on encrypted images.

The network (trained in plaintext by the model owner with the suite's recipe):
    x: image downsampled to 28x28 (area average), scaled to [-1, 1]
    conv 1->C, 7x7, stride 3 (8x8 outputs) + batch norm (folded into the conv for serving)
    square activation
    average pooling (pool x pool; linear, so folded into the dense layer for serving)
    dense C*(8/pool)^2 -> L logits

Encrypted evaluation per image (TenSEAL, like its encrypted-MNIST tutorial, with a cheaper
dense layer):
    data owner   im2col-encodes the image: 64 windows x 64 (49 padded) taps fill exactly
                 the 4096 slots of one N=8192 ciphertext
    model owner  per channel c: y_c = conv2d_im2col(x, K_c) + b_c        (6 rotations, 1 level)
                                y_c = y_c^2                                (relinearise, 1 level)
                 per label l:   z_l = sum_c y_c * W[l, c, :]               (plain products, 1 level)
                                z_l = sum over the 64 windows + bias       (6 rotations)
                                z_l = z_l * e_0                            (mask, 1 level)
                 The mask leaves only the logit in slot 0, so the data owner decrypts its
                 logit and nothing of the partial sums the rotations leave in other slots.
    data owner   decrypts L ciphertexts -> L logits -> sigmoid
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backends.he.params import (CKKSParams, key_sizes, pack_message, private_context,
                                public_context_bytes, receive_public_context, unpack_message)

SIDE, KERNEL, STRIDE = 28, 7, 3
OUT_SIDE = (SIDE - KERNEL) // STRIDE + 1          # 8
WINDOWS = OUT_SIDE * OUT_SIDE                     # 64
PADDED_TAPS = 1 << (KERNEL * KERNEL - 1).bit_length()   # 49 -> 64
IM2COL_SLOTS = WINDOWS * PADDED_TAPS              # 4096


@dataclass(frozen=True)
class CNNSpec:
    channels: int = 8
    pool: int = 1
    epochs: int = 20
    lr: float = 5e-3

    def key(self) -> dict:
        return {**asdict(self), "side": SIDE, "kernel": KERNEL, "stride": STRIDE}


def preprocess(images: np.ndarray):
    """xrv-range images [B, 1, H, W] -> [B, 1, 28, 28] in [-1, 1] (the data owner's step)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images, dtype=torch.float32)
    return F.adaptive_avg_pool2d(x, SIDE) / 1024.0


def build_net(spec: CNNSpec, n_labels: int):
    import torch
    from torch import nn

    if OUT_SIDE % spec.pool:
        raise ValueError(f"cnn_pool must divide {OUT_SIDE}, got {spec.pool}")

    class HEFriendlyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, spec.channels, KERNEL, stride=STRIDE)
            self.bn = nn.BatchNorm2d(spec.channels)
            self.pool = spec.pool
            self.fc = nn.Linear(spec.channels * (OUT_SIDE // spec.pool) ** 2, n_labels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: preprocessed [B, 1, 28, 28]
            y = self.bn(self.conv(x))
            y = y * y
            if self.pool > 1:
                y = torch.nn.functional.avg_pool2d(y, self.pool)
            return self.fc(y.flatten(1))

    return HEFriendlyCNN()


@dataclass
class DeployedCNN:
    """Serving weights: batch norm folded into the conv, pooling folded into the dense layer."""

    kernels: np.ndarray      # [C, 7, 7]
    conv_bias: np.ndarray    # [C]
    dense: np.ndarray        # [L, C, 64] (one weight per conv window)
    dense_bias: np.ndarray   # [L]

    @classmethod
    def from_net(cls, net) -> "DeployedCNN":
        import torch

        with torch.no_grad():
            bn = net.bn
            gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
            kernels = net.conv.weight.double()[:, 0] * gain[:, None, None]
            conv_bias = (net.conv.bias.double() - bn.running_mean.double()) * gain + bn.bias.double()
            p, side = net.pool, OUT_SIDE // net.pool
            w = net.fc.weight.double().reshape(-1, kernels.shape[0], side, side)
            # avg_pool then dense == dense with each pooled weight spread over its p x p cells
            w = w.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3) / (p * p)
            return cls(kernels.numpy(), conv_bias.numpy(), w.reshape(w.shape[0], w.shape[1], -1).numpy(),
                       net.fc.bias.double().numpy())

    def logits(self, x28: np.ndarray) -> np.ndarray:
        """Plaintext float64 reference of exactly what runs encrypted: [B, 1, 28, 28] -> [B, L]."""
        import torch

        x = torch.as_tensor(np.asarray(x28), dtype=torch.float64)
        k = torch.from_numpy(self.kernels)[:, None]
        y = torch.nn.functional.conv2d(x, k, torch.from_numpy(self.conv_bias), stride=STRIDE)
        y = (y * y).flatten(2)                                        # [B, C, 64]
        return (torch.einsum("bcw,lcw->bl", y, torch.from_numpy(self.dense))
                + torch.from_numpy(self.dense_bias)).numpy()


def train_cnn(train, output_index: list[int], n_labels: int, spec: CNNSpec, seed: int,
              quick: bool, cache_dir: Path | None, progress=None):
    """Train with the suite's recipe on 28x28 downsampled images; cached by data + spec."""
    import torch

    from suite.training import Recipe, train_logits_model

    epochs = max(2, spec.epochs // 4) if quick else spec.epochs
    key = hashlib.sha256(json.dumps([spec.key(), epochs, seed, train.fingerprint(), output_index,
                                     torch.__version__], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "he-cnn" / f"{key}.pt" if cache_dir else None
    net = build_net(spec, n_labels)
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["state_dict"] if "state_dict" in saved else saved)
            return net.eval(), {"cached": True, "epochs": epochs, "loss": saved.get("loss")}
        except Exception:   # a torn or foreign cache file: train again
            net = build_net(spec, n_labels)
    torch.manual_seed(seed)
    net = build_net(spec, n_labels)
    net.train()
    # the recipe augments at the dataset's resolution, as for the DenseNet; the net then
    # sees what the data owner will encrypt: the 28x28 area-downsampled image
    history = train_logits_model(lambda x: net(preprocess(x)), net.parameters(), train, output_index,
                                 Recipe(epochs=epochs, lr=spec.lr, seed=seed), on_epoch=progress)
    net.eval()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"state_dict": net.state_dict(), "loss": history[-1] if history else None}, tmp)
            tmp.replace(path)
        except OSError:
            pass
    return net, {"cached": False, "epochs": epochs, "loss": history[-1] if history else None}


class CNNDataOwner:
    """Holds the secret key; im2col-encrypts images, decrypts logits."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.ctx = private_context(params, galois=True)

    def public_context(self) -> bytes:
        return public_context_bytes(self.ctx, galois=True, relin=True)

    def key_sizes(self) -> dict[str, int]:
        return key_sizes(self.ctx, galois=True, relin=True)

    def encrypt(self, x28: np.ndarray) -> bytes:
        """One preprocessed image [28, 28] -> one serialised im2col ciphertext."""
        import tenseal as ts

        vec, windows = ts.im2col_encoding(self.ctx, np.asarray(x28, dtype=np.float64).tolist(),
                                          KERNEL, KERNEL, STRIDE)
        assert windows == WINDOWS
        return vec.serialize()

    def decrypt(self, blobs: list[bytes]) -> np.ndarray:
        import tenseal as ts

        return np.array([ts.ckks_vector_from(self.ctx, b).decrypt()[0] for b in blobs])

    def request(self, x28_batch: np.ndarray) -> bytes:
        return pack_message([self.encrypt(x[0]) for x in x28_batch])

    def open_response(self, message: bytes, n_labels: int) -> np.ndarray:
        blobs = unpack_message(message)
        return self.decrypt(blobs).reshape(-1, n_labels)


class CNNModelOwner:
    """Holds the deployed CNN and a public context (public, relinearisation, Galois keys)."""

    def __init__(self, public_context: bytes, model: DeployedCNN) -> None:
        self.ctx = receive_public_context(public_context)
        self.model = model
        self.kernels = [k.tolist() for k in model.kernels]
        self.dense = [[row.tolist() for row in per_label] for per_label in model.dense]

    def evaluate(self, blob: bytes) -> list[bytes]:
        """One im2col ciphertext -> L serialised ciphertexts, logit l in slot 0 of the l-th."""
        import tenseal as ts

        x = ts.ckks_vector_from(self.ctx, blob)
        acc: list = [None] * len(self.dense)
        for c, kernel in enumerate(self.kernels):
            y = x.conv2d_im2col(kernel, WINDOWS) + float(self.model.conv_bias[c])
            y.square_()
            for label, weights in enumerate(self.dense):
                term = y * weights[c]
                acc[label] = term if acc[label] is None else acc[label] + term
        out = []
        for label, z in enumerate(acc):
            z = z.sum() + float(self.model.dense_bias[label])
            z = z * [1.0]          # keep slot 0 (the logit), zero every other slot
            out.append(z.serialize())
        return out

    def handle(self, message: bytes) -> bytes:
        return pack_message([blob for image in unpack_message(message) for blob in self.evaluate(image)])
