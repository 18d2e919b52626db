"""Exact products over Z_2^64 (int64 convolutions and matrix products) on float64 kernels.

Why: every Beaver product CrypTen computes (the parties' eps * b + a * delta, the dealer's
c = a * b) is a conv2d or matmul of two int64 tensors, and torch's CPU kernels for int64 have
no BLAS path. Measured on this machine's torch 2.14.1, one thread: an int64 3x3 convolution
is 35x, a 1x1 one 60x slower than the same one in float64, and at DenseNet-121's size those
products were most of each party's (and the dealer's) CPU time.

How (what CrypTen's own CUDALongTensor does on GPUs, exact by construction): each operand is
split into n signed limbs of b bits, x = sum_i x_i 2^(b i) (mod 2^64), with balanced digits
|x_i| <= 2^(b-1) (the top limb is the sign-extended rest). A limb product is then an integer
of magnitude at most 2^(2b-2), and a sum of K of them (K = input channels x kernel size, the
contraction length) at most K * 2^(2b-2): exactly representable in float64, and every partial
sum a BLAS kernel forms on the way is too, whenever that bound is <= 2^53. Only limb pairs with
(i + j) * b < 64 matter modulo 2^64. With n = 3 (b = 22, 6 limb products) K may reach 2048,
which covers every product of the DenseNets here; longer contractions take n = 4 (b = 16,
10 products, K up to 2^23) or more. Each x-limb is convolved once with the stacked w-limbs it
pairs with, so the input is unfolded n times, not once per pair. A w whose upper limbs are all
zero (the model owner's plain fixed-point weights, |w| < 2^43) skips their products: 5 limb
products instead of 6.

`install(crypten)` routes CrypTen's int64 conv2d / matmul through `ring_conv2d` /
`ring_matmul` in the modules that compute them (beaver, the TTP dealer, the TFP provider,
public-operand products); anything else (other dtypes, GPU tensors, grouped convolutions)
goes to torch unchanged. tests/test_mpc_ring.py checks the results bit for bit against
torch's int64 kernels at the largest magnitudes and contraction lengths allowed.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import torch

#: the largest integer up to which every float64 integer is exact
EXACT = 2 ** 53
_state = {"installed": False}


def limb_plan(k: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(limbs n, bits per limb b, contributing limb pairs) for a contraction of length k."""
    for n in range(3, 9):
        b = math.ceil(64 / n)
        bound = [b - 1] * (n - 1) + [63 - b * (n - 1)]          # log2 of each limb's magnitude
        pairs = [(i, j) for i in range(n) for j in range(n) if (i + j) * b < 64]
        worst = max(bound[i] + bound[j] for i, j in pairs)
        if k * 2.0 ** worst <= EXACT:
            return n, b, pairs
    raise ValueError(f"contraction of length {k} is too long for exact float64 limbs")


def limbs(x: torch.Tensor, n: int, b: int) -> list[torch.Tensor]:
    """Balanced b-bit limbs of int64 `x` as float64: x == sum_i limbs[i] * 2^(b i) mod 2^64."""
    out = []
    for i in range(n - 1):
        d = (x << (64 - b)) >> (64 - b)                # low b bits, sign-extended: |d| <= 2^(b-1)
        out.append(d.double())
        x = (x - d) >> b                               # exact: the low b bits are zero (mod 2^64)
    out.append(x.double())                             # the sign-extended rest: |x| < 2^(63-b(n-1))
    return out


def _combine(parts: dict[tuple[int, int], torch.Tensor], b: int) -> torch.Tensor:
    """sum over pairs of 2^(b (i+j)) * part, in int64 (wrapping mod 2^64)."""
    out = None
    for (i, j), part in parts.items():
        term = part.long()
        shift = b * (i + j)
        if shift:
            term <<= shift
        out = term if out is None else out.add_(term)
    return out


def _ring_product(x: torch.Tensor, w: torch.Tensor, k: int, product, split: int, w_dim: int) -> torch.Tensor:
    """product(x_limb, stacked w_limbs) per x-limb, split back along w's stacked axis."""
    n, b, pairs = limb_plan(k)
    xs, ws = limbs(x, n, b), limbs(w, n, b)
    # a small operand (a plain weight) has all-zero upper limbs: their products are skipped
    zero = [j > 0 and not bool(wj.any()) for j, wj in enumerate(ws)]
    parts = {}
    for i in range(n):
        js = [j for (p, j) in pairs if p == i and not zero[j]]
        stacked = torch.cat([ws[j] for j in js], dim=w_dim) if len(js) > 1 else ws[js[0]]
        y = product(xs[i], stacked)
        for j, piece in zip(js, torch.split(y, split, dim=1 if w_dim == 0 else -1)):
            parts[(i, j)] = piece
    return _combine(parts, b)


def _is_ring(*ts: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.dtype == torch.long
               and t.device.type == "cpu" for t in ts)


def ring_conv2d(x: torch.Tensor, w: torch.Tensor, bias=None, stride=1, padding=0, dilation=1,
                groups=1) -> torch.Tensor:
    """torch.conv2d for int64 x, w (mod 2^64, bit for bit), on float64 kernels."""
    if bias is not None or groups != 1 or not _is_ring(x, w) or isinstance(padding, str):
        return torch.conv2d(x, w, bias, stride, padding, dilation, groups)
    k = w.shape[1] * w.shape[2] * w.shape[3]

    def conv(a, ww):
        return torch.conv2d(a, ww, None, stride, padding, dilation)
    return _ring_product(x, w, k, conv, w.shape[0], w_dim=0)


def ring_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch.matmul for int64 x, w with w at least 2-D (mod 2^64, bit for bit)."""
    if not _is_ring(x, w) or x.dim() < 1 or w.dim() < 2:
        return torch.matmul(x, w)
    return _ring_product(x, w, w.shape[-2], torch.matmul, w.shape[-1], w_dim=-1)


class _RingTorch(types.ModuleType):
    """`torch` as seen by CrypTen's product code: conv2d and matmul exact on float64 kernels."""

    conv2d = staticmethod(ring_conv2d)
    matmul = staticmethod(ring_matmul)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


#: CrypTen 0.4.1 modules whose `getattr(torch, op)(a, b)` computes int64 products
PRODUCT_MODULES = ("crypten.mpc.primitives.beaver", "crypten.mpc.primitives.arithmetic",
                   "crypten.mpc.provider.ttp_provider", "crypten.mpc.provider.tfp_provider")


def install(crypten: Any) -> None:
    """Give CrypTen's product modules the ring `torch` (idempotent)."""
    if _state["installed"]:
        return
    proxy = _RingTorch("torch")
    for name in PRODUCT_MODULES:
        module = sys.modules.get(name)
        if module is None or getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"CrypTen changed: {name} no longer uses the torch module for its products")
        module.torch = proxy
    _state["installed"] = True
