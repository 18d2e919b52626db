"""The packed two-party MSB circuit, on a plaintext simulation of both parties' shares.

The real protocol runs in test_mpc.py (and the conformance test); here every share-local
step runs on both parties' shares stacked along a leading axis, and the AND gates
reconstruct, AND and re-share with fresh randomness: if the circuit is right for every
element count and every sign, it is right under MPC, whose gates are CrypTen's.
"""

from __future__ import annotations

import pytest
import torch

from backends.mpc.protocol import (
    MASK63, TOP, _result_size, carry_tree, pack_bits, relu_triple_requests, truncate_triple_requests,
    unpack_bits,
)

GEN = torch.Generator().manual_seed(0)


def _rand64(shape):
    return torch.randint(-2 ** 63, 2 ** 63 - 1, shape, generator=GEN, dtype=torch.long)


def sim_and(xs, ys):
    out = []
    for x, y in zip(xs, ys):
        z = (x[0] ^ x[1]) & (y[0] ^ y[1])
        r = _rand64(z.shape)
        out.append(torch.stack([z ^ r, r]))
    return out


def sim_msb(x: torch.Tensor) -> torch.Tensor:
    """MSB of x from random two-party additive shares, exactly as msb_shares does per party."""
    s0 = _rand64(x.shape)
    s1 = x - s0
    low = torch.stack([s0 & MASK63, s1 & MASK63])
    zero = torch.zeros_like(low[0])
    (g,) = sim_and([torch.stack([low[0], zero])], [torch.stack([zero, low[1]])])
    p = torch.stack([low[0] ^ TOP, low[1]])
    bits = carry_tree(g, p, sim_and) ^ ((torch.stack([s0, s1]) >> 63) & 1)
    return bits[0] ^ bits[1]


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 63, 64, 65, 1000])
def test_msb_circuit_is_exact(n):
    x = torch.randint(-2 ** 45, 2 ** 45, (n,), generator=GEN, dtype=torch.long)
    edge = torch.tensor([0, -1, 1, -2 ** 45, 2 ** 45, 2 ** 62, -2 ** 62, -2 ** 63, 2 ** 63 - 1])
    x[: min(n, len(edge))] = edge[: min(n, len(edge))]
    assert torch.equal(sim_msb(x), (x < 0).long())


def sim_truncate(y: torch.Tensor, d: int) -> torch.Tensor:
    """floor(y / 2^d) from random two-party shares, as TwoPartyGates.truncate computes it
    (wrap_msb_shares per party, then the bits' arithmetic shares and local shifts)."""
    s = torch.stack([_rand64(y.shape), torch.zeros_like(y)])
    s[1] = y - s[0]
    zero = torch.zeros_like(y)
    (g,) = sim_and([torch.stack([s[0], zero])], [torch.stack([zero, s[1]])])
    low = s & MASK63
    p = torch.stack([low[0] ^ TOP, low[1]])
    c63 = carry_tree(g & MASK63, p, sim_and)
    p63 = (s >> 63) & 1
    (t,) = sim_and([pack_bits(p63)], [pack_bits(c63)])
    w, msb = ((g >> 63) & 1) ^ unpack_bits(t, y.shape[-1]), p63 ^ c63
    w, msb = w[0] ^ w[1], msb[0] ^ msb[1]                # B2A: reconstruct, share arithmetically
    assert torch.equal(msb, (y < 0).long())
    logical = (s >> d) & ((1 << (64 - d)) - 1)
    return logical[0] + logical[1] - (w + msb) * (1 << (64 - d))


@pytest.mark.parametrize("d", [12, 16, 20, 24])
def test_exact_truncation_never_wraps(d):
    # magnitudes up to 2^62: local truncation would fail on about |y| / 2^64 of them (~1/4 here)
    y = torch.randint(-2 ** 62, 2 ** 62, (4000,), generator=GEN, dtype=torch.long)
    y[:6] = torch.tensor([0, -1, 1, 2 ** 62 - 1, -2 ** 62, -(2 ** d)])
    got = sim_truncate(y, d)
    want = torch.div(y, 2 ** d, rounding_mode="floor")
    assert int((got - want).abs().max()) <= 1 and bool((got <= want).all())


def test_truncation_costs_about_one_relu():
    n = 1 << 14
    words = lambda reqs: sum(a[0][0] for f, a in reqs if f == "binary")  # noqa: E731
    assert words(truncate_triple_requests(n)) <= words(relu_triple_requests(n)) + n // 32


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_bit_packing_round_trips(n):
    bits = torch.randint(0, 2, (2, n), generator=GEN)
    assert torch.equal(unpack_bits(pack_bits(bits), n), bits)


def test_relu_uses_fewer_and_words_than_cryptens_adder():
    n = 1 << 14
    words = sum(args[0][0] for f, args in relu_triple_requests(n) if f == "binary")
    # CrypTen's A2B adder: 1 AND on n words + 6 levels on 2n stacked words = 13n
    assert words < 5 * n < 13 * n


@pytest.mark.parametrize("args,kwargs", [
    (("binary", (torch.Size([5, 3]), torch.Size([5, 3]))), {}),
    (("B2A", (torch.Size([7]),)), {}),
    (("additive", (torch.Size([2, 3, 1, 1]), torch.Size([1, 3, 1, 1]), "mul")), {}),
    (("additive", (torch.Size([4, 6]), torch.Size([6, 2]), "matmul")), {}),
    (("additive", (torch.Size([2, 3, 17, 16]), torch.Size([5, 3, 7, 7]), "conv2d")),
     {"stride": 2, "padding": 3}),
    (("additive", (torch.Size([2, 3, 8, 8]), torch.Size([5, 3, 3, 3]), "conv2d")),
     {"stride": 1, "padding": 1}),
])
def test_dealer_answer_sizes_match_torch(args, kwargs):
    func, a = args
    got = _result_size(func, a, kwargs)
    if func == "additive":
        x = torch.empty(a[0], device="meta")
        y = torch.empty(a[1], device="meta")
        want = getattr(torch, a[2])(x, y, **kwargs).shape
    else:
        want = torch.broadcast_shapes(*a) if func == "binary" else a[0]
    assert got == want
