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
    MASK63, TOP, carry_tree, pack_bit_pairs, pack_bits, relu_triple_requests, result_size,
    truncate_triple_requests, unpack_bit_pairs, unpack_bits,
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
    # (the circuit runs without a dealer: compare with the first-party ReLU)
    assert _and_words(truncate_triple_requests(n)) <= _and_words(relu_triple_requests(n, dealer=False)) + n // 32


def _and_words(requests) -> int:
    """AND words (triple outputs) in a list of dealer requests."""
    return sum(int(result_size(f, a, {}).numel()) for f, a in requests if f == "binary")


def _opened_words(requests) -> int:
    """Words one party opens for the ANDs of a list of dealer requests (both operands' masks)."""
    return sum(int(a[0].numel() + a[1].numel()) for f, a in requests if f == "binary")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_bit_packing_round_trips(n):
    bits = torch.randint(0, 2, (2, n), generator=GEN)
    assert torch.equal(unpack_bits(pack_bits(bits), n), bits)


def test_relu_uses_fewer_and_words_than_cryptens_adder():
    n = 1 << 14
    requests = relu_triple_requests(n, dealer=False)        # the circuit alone
    words = _and_words(requests)
    # CrypTen's A2B adder: 1 AND on n words + 6 levels on 2n stacked words = 13n
    assert words < 5 * n < 13 * n
    # the tree's paired ANDs share one operand: it is opened once (3 words per 2 ANDs)
    assert _opened_words(requests) < 8 * n < 2 * words


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
    got = result_size(func, a, kwargs)
    if func == "additive":
        x = torch.empty(a[0], device="meta")
        y = torch.empty(a[1], device="meta")
        want = getattr(torch, a[2])(x, y, **kwargs).shape
    else:
        want = torch.broadcast_shapes(*a) if func == "binary" else a[0]
    assert got == want


def sim_pair_truncate(y: torch.Tensor, d: int, wrap: bool = True) -> torch.Tensor:
    """floor(y / 2^d) from random two-party shares and a dealer's truncation pair, as
    TwoPartyGates._truncate_with_pair computes it per party (wrap=False: a broken variant
    that ignores the mask's wrap)."""
    from backends.mpc.protocol import OFFSET, truncate_from_opening, truncation_pair

    y0 = _rand64(y.shape)
    y1 = y - y0
    r = _rand64(y.shape)
    t, m = truncation_pair(r, d)
    if not wrap:
        m = torch.zeros_like(m)
    r0, t0, m0 = _rand64(y.shape), _rand64(y.shape), _rand64(y.shape)
    z = (y0 + r0 + OFFSET) + (y1 + (r - r0))             # the one opening
    return (truncate_from_opening(z, t0, m0, d, 0) + truncate_from_opening(z, t - t0, m - m0, d, 1))


@pytest.mark.parametrize("d", [12, 16, 20, 24])
def test_truncation_pair_is_exact_within_one_ulp_up_to_2_62(d):
    y = torch.randint(-2 ** 62, 2 ** 62, (4000,), generator=GEN, dtype=torch.long)
    y[:6] = torch.tensor([0, -1, 1, 2 ** 62 - 1, -2 ** 62, -(2 ** d)])
    want = torch.div(y, 2 ** d, rounding_mode="floor")
    err = sim_pair_truncate(y, d) - want
    assert bool(((err == 0) | (err == 1)).all())
    # positive control: without the mask's wrap term about half the values are off by 2^(64-d)
    broken = sim_pair_truncate(y, d, wrap=False) - want
    assert float((broken.abs() > 1).double().mean()) > 0.2


def test_truncation_pair_opening_does_not_depend_on_the_secret():
    from backends.mpc.protocol import OFFSET

    y = torch.full((20000,), 12345 << 20)
    z = y + OFFSET + _rand64(y.shape)                    # what both parties see
    bits = ((z.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean(0)
    assert float((bits - 0.5).abs().max()) < 0.02        # every bit uniform for a fixed secret


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_bit_pairs_open_to_the_xor_of_both_parties_bits(n):
    b0, b1 = torch.randint(0, 2, (n,), generator=GEN), torch.randint(0, 2, (n,), generator=GEN)
    opened = pack_bit_pairs(b0) + pack_bit_pairs(b1)          # the SUM all_reduce
    assert torch.equal(unpack_bit_pairs(opened, n), b0 ^ b1)
    # positive control: packed one per bit, a SUM carries into the neighbour
    assert n < 2 or not torch.equal(unpack_bits(pack_bits(b0) + pack_bits(b1), n), b0 ^ b1)


def test_relu_mask_gives_x_times_d_with_one_opening():
    """relu's last step on a simulation of both parties: d = z xor r, x * r = c + eps * r_A."""
    x = torch.randint(-2 ** 40, 2 ** 40, (500,), generator=GEN)
    d = torch.randint(0, 2, (500,), generator=GEN)
    x0 = _rand64(x.shape)
    x1 = x - x0
    r = torch.randint(0, 2, (500,), generator=GEN)
    a = _rand64(x.shape)
    c = a * r
    ra0, c0, a0 = _rand64(x.shape), _rand64(x.shape), _rand64(x.shape)
    shares = [(x0, ra0, c0, a0), (x1, r - ra0, c - c0, a - a0)]
    eps = sum(xi - ai for xi, _, _, ai in shares)
    z = d ^ r
    out = sum(z * xi + (1 - 2 * z) * (ci + eps * rai) for xi, rai, ci, _ in shares)
    assert torch.equal(out, x * d)


def sim_narrow_sign(y: torch.Tensor, r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([y >= 0], the opened c) from random two-party shares and a dealer's comparison mask, as
    TwoPartyGates._narrow_drelu computes it per party (borrow_shares on each party's bits)."""
    from backends.mpc.protocol import NARROW_BITS, pack_low_bits

    n = y.shape[-1]
    r = _rand64(y.shape) if r is None else r
    c = y + (1 << NARROW_BITS) + r                       # the one opening (uniform: r is)
    low, top = pack_low_bits(r), pack_bits((r >> NARROW_BITS) & 1)
    l1, t1 = _rand64(low.shape), _rand64(top.shape)
    rho, rho_top = torch.stack([low ^ l1, l1]), torch.stack([top ^ t1, t1])
    not_c = ~pack_low_bits(c)                            # borrow_shares, both parties stacked
    g, p = rho & not_c, torch.stack([rho[0] ^ not_c, rho[1]])
    d = carry_tree(g, p, sim_and, first_level=1, n=n) ^ unpack_bits(rho_top, n)
    d[0] ^= (c >> NARROW_BITS) & 1
    return d[0] ^ d[1], c


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 1000])
def test_narrow_comparison_is_exact_up_to_its_bound(n):
    from backends.mpc.protocol import NARROW_BITS

    k = 1 << NARROW_BITS
    y = torch.randint(-k, k, (n,), generator=GEN, dtype=torch.long)
    edge = torch.tensor([0, -1, 1, -k, k - 1, -k + 1, k - 2])        # at the bound, both sides
    y[:min(n, len(edge))] = edge[:min(n, len(edge))]
    assert torch.equal(sim_narrow_sign(y)[0], (y >= 0).long())


def test_narrow_comparison_fails_beyond_its_bound():
    """Positive control for the bound: just outside [-2^32, 2^32) every sign comes out wrong
    (why the model owner keeps 2^8 headroom below it, `plan.Calibration.narrow_precision`)."""
    from backends.mpc.protocol import NARROW_BITS

    k = 1 << NARROW_BITS
    y = torch.tensor([k, k + 5, -k - 1, -k - 7] * 50)
    assert not bool((sim_narrow_sign(y)[0] == (y >= 0).long()).any())


def test_narrow_comparison_opening_does_not_depend_on_the_secret():
    y = torch.full((20000,), -(12345 << 10))
    _, c = sim_narrow_sign(y)
    bits = ((c.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean(0)
    assert float((bits - 0.5).abs().max()) < 0.02        # every bit uniform for a fixed secret
    # positive control: a mask with a fixed low half (a broken dealer) shows the secret's bits
    r = _rand64(y.shape) & ~0xFFFFFFFF
    _, c = sim_narrow_sign(y, r)
    bits = ((c.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean(0)
    assert float((bits - 0.5).abs().max()) > 0.4


def test_narrow_relu_opens_fewer_words_and_needs_no_generate_and():
    n = 1 << 14
    wide, narrow = relu_triple_requests(n), relu_triple_requests(n, narrow=True)
    assert _and_words(narrow) * 2 < _and_words(wide)
    assert _opened_words(narrow) + n < _opened_words(wide) // 2 + n      # + the one opening of c
    assert len([r for r in narrow if r[0] == "binary"]) == len([r for r in wide if r[0] == "binary"]) - 2


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.75])
def test_fixed_point_emulation_rounds_as_the_protocol_does(frac):
    """plan.FixedPointOps (the model owner's fidelity prediction) against both truncations on
    their share simulations: same outcomes (floor + 0/1 ulp with pairs, floor - 1/0 with the
    circuit) with the same probabilities; the other rounding mode is the control."""
    from backends.mpc.plan import FixedPointOps

    d, n = 20, 20000
    y = torch.full((n,), (12345 << d) + int(frac * 2 ** d), dtype=torch.long)
    floor = 12345
    pair = sim_pair_truncate(y, d) - floor
    circuit = sim_truncate(y, d) - floor
    real = y.double() / 2.0 ** (2 * d)                  # the product as the emulation sees it
    emulated = {m: torch.round(FixedPointOps(d, rounding=m)._truncated(real) * 2.0 ** d).long() - floor
                for m in ("pair", "circuit")}
    for protocol, mode, other, values in ((pair, "pair", "circuit", (0, 1)), (circuit, "circuit", "pair", (-1, 0))):
        assert set(protocol.unique().tolist()) <= set(values)
        assert set(emulated[mode].unique().tolist()) <= set(values)
        assert abs(float(protocol.double().mean() - emulated[mode].double().mean())) < 0.03
        assert abs(float(protocol.double().mean() - emulated[other].double().mean())) > 0.9
