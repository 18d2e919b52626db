"""A leaner two-party ReLU for CrypTen shares (same primitives, same providers, less work).

CrypTen's ReLU is `x * (x >= 0)`: it converts the whole arithmetic sharing to a binary one
with a 64-bit parallel-prefix adder (1 + 6 rounds of ANDs on 1 + 6 x 2 words per element),
keeps only the top bit, converts that bit back to arithmetic (1 round), then multiplies
(1 round): 9 rounds, ~13 AND-words and ~26 opened words per element per party.

Here, for two parties holding x = x0 + x1 (mod 2^64):

    MSB(x) = MSB(x0) xor MSB(x1) xor carry63,   carry63 = carry out of low63(x0) + low63(x1)

Only that one carry is computed, by a generate/propagate tree in which each level halves
the useful bits per element, so the survivors of two words are packed into one (local bit
moves on XOR shares). Total AND work is ~5 words per element instead of ~13. The last bit
conversion and the multiplication share one round: with (r_A, r_B) a random bit shared
both ways (CrypTen's B2A_rng) and z = d xor r opened,

    x * d = z * x + (1 - 2z) * (x * r_A)

and x * r_A is a Beaver multiplication whose openings travel in the same message as z.
So ReLU costs 8 rounds and about 40% of CrypTen's bytes. Every AND, bit conversion and
multiplication uses the provider CrypTen is configured with (trusted first party or
third-party dealer) exactly as CrypTen's own gates do; only the circuit is smaller.

Exact truncation. A product of two fixed-point encodings carries 2p fractional bits and must
be divided by 2^p. CrypTen's two-party division is local (each party shifts its own share),
which is wrong by about 2^(64-p) whenever the shares wrap around the ring: probability
|y| * 2^(2p-64) per value. On a trained model that is negligible; on a model whose
activations reach thousands (random BatchNorm statistics) a 64 px DenseNet expects about one
such failure per hundred images, and the precision it needs makes it worse. `truncate`
removes the failure: with u0, u1 the shares read as unsigned and y = u0 + u1 - w * 2^64,

    floor(y / 2^d) = (u0 >> d) + (u1 >> d) - (w + MSB(y)) * 2^(64-d)   (+1 ulp, dropped)

(logical shifts, arithmetic mod 2^64). The wrap bit w is the carry out of bit 63 and MSB(y)
= p63 xor carry63, so both come from the same carry tree as the ReLU's plus one AND
(w = g63 xor (p63 and carry63)); one opening converts both bits to arithmetic shares
(CrypTen's B2A_rng). Cost ~ one ReLU (9 rounds), and the result is wrong by at most one
least significant bit for any |y| * 2^(2p) < 2^63.

With the third-party dealer (triples=ttp, the default) three things are cheaper still,
because the dealer can hand out correlated randomness beyond Beaver triples:

* Truncation pairs. The dealer shares a uniform r together with r >> d and MSB(r); the
  parties open z = y + 2^62 + r (uniform whatever y is) and each computes its share of
  floor(y / 2^d) locally (`truncate_from_opening`): one round of n words instead of the
  carry circuit, exact within one ulp for |y| < 2^62 (the precision's 2^8 headroom keeps
  products below 2^55).
* The ReLU's last step uses a ReLU mask: a random bit r (shared both ways), a uniform a and
  c = a * r, so x * r = c + (x - a) * r needs only x - a opened, and the masked bit d xor r
  travels packed 32 per word (`pack_bit_pairs`), in the same message.
* Plain weights. Every product's second operand is the model owner's own weight, which it
  keeps in clear: `plain_product` costs one product per party (not two) and opens only the
  data owner's masked input; the weight reaches the data owner once, one-time-padded by the
  dealer's mask b.
In every case a mask is used once per opened value (b per weight, whose masked value is the
same every time), so what a party sees is uniformly random whatever the secret; the leak
tests (tests/test_mpc_leaks.py) check this on the real two-process path, with broken variants.

The carry tree's paired ANDs (p_hi & g_lo, p_hi & p_lo) share their first operand, which is
opened once (`_and_shared`, one triple with a broadcast a): 3 words opened per 2 ANDs.

`carry_tree` is written over share tensors with an injected AND, so tests run it on a
plaintext simulation of both parties' shares.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

MASK63 = (1 << 63) - 1
TOP = -(1 << 63)                      # bit 63 as an int64
#: mask of the "low" block positions at level L (bit L of the position is 0)
LEVEL_MASKS = [0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F,
               0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0x00000000FFFFFFFF]
AndFn = Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


def carry_tree(g: torch.Tensor, p: torch.Tensor, and_fn: AndFn, first_level: int = 0,
               n: int | None = None) -> torch.Tensor:
    """XOR-shares of the carry out of bit 63 for each element (0/1 in bit 0).

    g, p: shares of the per-bit generate / propagate words, shape [..., n] (the last axis
    indexes elements; leading axes, if any, are carried along, e.g. simulated parties).
    Level L combines adjacent blocks of 2^L bits: G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo;
    afterwards each element has half as many block bits, so two words are packed into one.
    first_level=1: the words already hold the layout after one packing (`pack_low_bits`:
    n elements of 32 one-bit blocks, two per word), so the tree starts at level 1.
    """
    n = g.shape[-1] if first_level == 0 else int(n)
    word = torch.arange(n, device=g.device)                # where each element lives: word index, bit slot
    slot = torch.zeros(n, dtype=torch.long)

    def follow_pack(words_after: int, shift: int) -> None:  # `_pack` moved the second half up
        nonlocal word, slot
        moved = word >= words_after
        word = torch.where(moved, word - words_after, word)
        slot = torch.where(moved, slot + shift, slot)

    count = n
    for level in range(first_level):                       # the packings already done
        count = (count + 1) // 2
        follow_pack(count, 1 << level)
    for level in range(first_level, 6):
        shift = 1 << level
        m = _signed(LEVEL_MASKS[level])
        g_lo, g_hi = g & m, (g >> shift) & m
        p_lo, p_hi = p & m, (p >> shift) & m
        if level < 5:
            t_g, t_p = and_fn([p_hi, p_hi], [g_lo, p_lo])
            # AND outputs are random in every bit of each share: mask before packing
            g, p = _pack((g_hi ^ t_g) & m, shift), _pack(t_p & m, shift)
            follow_pack(g.shape[-1], shift)
        else:
            (t_g,) = and_fn([p_hi], [g_lo])
            g = g_hi ^ t_g
    return (g[..., word] >> slot) & 1


def _pack(w: torch.Tensor, shift: int) -> torch.Tensor:
    """Words [A | B] (last axis) -> A | (B << shift), A the first half rounded up."""
    k = w.shape[-1]
    h = (k + 1) // 2
    a, b = w[..., :h], w[..., h:]
    if b.shape[-1] < h:
        b = torch.cat([b, torch.zeros_like(a[..., :h - b.shape[-1]])], dim=-1)
    return a ^ (b << shift)          # disjoint supports: XOR == OR, and XOR is share-linear


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _generate_and_carry63(share: torch.Tensor, rank: int, and_fn: AndFn) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR-shares of the generate bits g = x0 & x1 (all 64) and of carry63, the carry into
    bit 63 of x0 + x1, for this party's arithmetic share of x (flat)."""
    zero = torch.zeros_like(share)
    u, v = (share, zero) if rank == 0 else (zero, share)  # each party's bits, as its own input
    (g,) = and_fn([u], [v])
    low = share & MASK63
    p = low ^ TOP if rank == 0 else low                 # bit 63 propagates: the carry passes
    return g, carry_tree(g & MASK63, p, and_fn)


def msb_shares(share: torch.Tensor, rank: int, and_fn: AndFn) -> torch.Tensor:
    """This party's XOR-share (0/1) of MSB(x) for its arithmetic share `share` of x (flat)."""
    _, c63 = _generate_and_carry63(share, rank, and_fn)
    return c63 ^ ((share >> 63) & 1)


def wrap_msb_shares(share: torch.Tensor, rank: int, and_fn: AndFn) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's XOR-shares (0/1) of (w, MSB(y)) for its share of y (flat): w is the carry
    out of the unsigned 64-bit sum of the two shares."""
    g, c63 = _generate_and_carry63(share, rank, and_fn)
    p63 = (share >> 63) & 1                              # this party's XOR-share of bit 63's propagate
    (t,) = and_fn([pack_bits(p63)], [pack_bits(c63)])    # one bit per element: 64 per word
    return ((g >> 63) & 1) ^ unpack_bits(t, share.shape[-1]), p63 ^ c63


_BIT = torch.arange(64, dtype=torch.long)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values along the last axis -> words of 64 (a local move of XOR-shares)."""
    n = bits.shape[-1]
    pad = (-n) % 64
    if pad:
        bits = torch.cat([bits, torch.zeros(bits.shape[:-1] + (pad,), dtype=bits.dtype)], dim=-1)
    return (bits.reshape(bits.shape[:-1] + (-1, 64)) << _BIT).sum(-1)    # disjoint bits: sum = XOR


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    return ((words.unsqueeze(-1) >> _BIT) & 1).reshape(words.shape[:-1] + (-1,))[..., :n]


#: the ReLU's narrow comparison (with the dealer): the sign of y for |y| < 2^NARROW_BITS from
#: its low NARROW_BITS + 1 bits, two elements per word in the carry tree
NARROW_BITS = 32
_SPREAD = [(16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
           (2, 0x3333333333333333), (1, 0x5555555555555555)]


def comparison_mask_words(n: int) -> tuple[int, int]:
    """Words of a comparison mask's bit shares for n elements: its low NARROW_BITS bits in
    `pack_low_bits` layout (two elements per word), and its bit NARROW_BITS (`pack_bits`)."""
    return (n + 1) // 2, (n + 63) // 64


def pack_low_bits(v: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of each int64 (last axis, n) as the carry tree's layout after its first
    packing: bit i of element e at position 2i (+1 for the second half's elements), ceil(n/2)
    words. A local move of XOR-shares, and of public values."""
    x = v & 0xFFFFFFFF
    for shift, mask in _SPREAD:                 # Morton spread: bit i -> position 2i
        x = (x | (x << shift)) & _signed(mask)
    return _pack(x, 1)


def borrow_shares(c: torch.Tensor, rho_low: torch.Tensor, rank: int, and_fn: AndFn) -> torch.Tensor:
    """XOR-shares (0/1) of [c mod 2^32 < r mod 2^32] for public c (n values) and r's low bits
    XOR-shared in `pack_low_bits` layout: the borrow out of c - r, i.e. the carry of the tree
    with generate r_i & ~c_i and propagate ~(r_i ^ c_i) (both local: c is public)."""
    not_c = ~pack_low_bits(c)
    g = rho_low & not_c
    p = rho_low ^ not_c if rank == 0 else rho_low
    return carry_tree(g, p, and_fn, first_level=1, n=c.shape[-1])


def _tree_requests(n: int) -> list[tuple[str, tuple]]:
    size = torch.Size
    return [("binary", (size([n]), size([n])))] + _level_requests(n, 0)     # g = u & v, the tree


def _level_requests(k: int, first_level: int) -> list[tuple[str, tuple]]:
    """The carry tree's ANDs from `first_level` on, k words at that level."""
    size = torch.Size
    out = []
    for level in range(first_level, 6):
        if level < 5:                                     # p_hi & [g_lo, p_lo]: one shared operand
            out.append(("binary", (size([1, k]), size([2, k]))))
        else:
            out.append(("binary", (size([k]), size([k]))))
        k = (k + 1) // 2
    return out


def truncate_triple_requests(n: int) -> list[tuple[str, tuple]]:
    """The dealer requests one `TwoPartyGates.truncate` on n elements makes, in order."""
    size = torch.Size
    words = (n + 63) // 64
    return _tree_requests(n) + [("binary", (size([words]), size([words]))), ("B2A", (size([2 * n]),))]


def relu_triple_requests(n: int, dealer: bool = True, narrow: bool = False) -> list[tuple[str, tuple]]:
    """The dealer requests one `TwoPartyGates.relu` on n elements makes, in order (dealer=False:
    what the trusted-first-party variant draws; narrow: the NARROW_BITS comparison)."""
    size = torch.Size
    if narrow:
        return ([("cmp_mask", (size([n]),))] + _level_requests(comparison_mask_words(n)[0], 1)
                + [("relu_mask", (size([n]),))])
    out = _tree_requests(n)
    if dealer:
        out.append(("relu_mask", (size([n]),)))
    else:
        out.append(("B2A", (size([n]),)))
        out.append(("additive", (size([n]), size([n]), "mul")))
    return out


def relu_mask_shares(size: torch.Size, rank: int, device=None) -> tuple[torch.Tensor, ...]:
    """This party's shares of a ReLU mask from the dealer: a random bit r (XOR share r_B and
    arithmetic share r_A), a uniform a and c = a * r, so that x * r = c + (x - a) * r with one
    opening (x - a). Party 0 receives its r_A and c (`serve_dealer`'s `relu_mask`)."""
    from crypten.mpc.provider import ttp_provider

    client = ttp_provider.TTPClient.get()
    generator = client.get_generator(device=device)
    ring = ttp_provider.generate_random_ring_element
    r_b = ttp_provider.generate_kbit_random_tensor(size, bitlength=1, generator=generator, device=device)
    a = ring(size, generator=generator, device=device)
    if rank == 0:
        rc = client.ttp_request("relu_mask", device, size)
        return r_b, rc[0], a, rc[1]
    return r_b, ring(size, generator=generator, device=device), a, ring(size, generator=generator, device=device)


def comparison_mask_shares(size: torch.Size, rank: int, device=None) -> tuple[torch.Tensor, ...]:
    """This party's shares of a comparison mask from the dealer: a uniform r (arithmetic share)
    with XOR-shares of its low NARROW_BITS bits (`pack_low_bits` layout) and of its bit
    NARROW_BITS (`pack_bits`). Party 0 receives its bit shares (`serve_dealer`'s `cmp_mask`)."""
    from crypten.mpc.provider import ttp_provider

    client = ttp_provider.TTPClient.get()
    generator = client.get_generator(device=device)
    ring = ttp_provider.generate_random_ring_element
    low, top = comparison_mask_words(int(torch.Size(size).numel()))
    r = ring(size, generator=generator, device=device)
    if rank == 0:
        bits = client.ttp_request("cmp_mask", device, size)
        return r, bits[:low], bits[low:]
    return (r, ring(torch.Size([low]), generator=generator, device=device),
            ring(torch.Size([top]), generator=generator, device=device))


_PAIR_SLOTS = torch.arange(0, 64, 2, dtype=torch.long)


def pack_bit_pairs(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values -> words of 32, one per 2-bit field: a SUM of two parties' words keeps each
    field's b0 + b1 <= 2 in its field, so the opened field's low bit is b0 xor b1."""
    n = bits.shape[-1]
    pad = (-n) % 32
    if pad:
        bits = torch.cat([bits, torch.zeros(pad, dtype=bits.dtype)])
    return (bits.reshape(-1, 32) << _PAIR_SLOTS).sum(-1)


def unpack_bit_pairs(words: torch.Tensor, n: int) -> torch.Tensor:
    return ((words.unsqueeze(-1) >> _PAIR_SLOTS) & 1).reshape(-1)[:n]


class DealerClient:
    """Party 0's side of the triple dealer, replacing CrypTen's TTP client requests.

    CrypTen's TTP client sends one request per triple, then receives the answer's size as a
    pickled object and the answer itself: a round trip to the dealer per gate, and two
    point-to-point receives that cost milliseconds of CPU each with gloo. Here party 0
    computes the answer's size itself (it knows the request), so the dealer sends only the
    tensor; and a list of requests can be announced in one message (`announce`: one ReLU
    needs 9 triples), after which the dealer computes the next triple while the parties
    use the current one. The answers are what CrypTen's dealer computes (same generators,
    same order), so party 1, which draws its shares locally, is unaffected.
    """

    def __init__(self) -> None:
        from collections import deque

        import crypten.communicator as comm
        from crypten.mpc.provider.ttp_provider import TTPClient

        self.comm = comm.get()
        self.client = TTPClient.get()
        self.expected: deque = deque()
        self.planned = False          # a whole batch announced ahead (`plan_batch`)
        self.client.ttp_request = self._ttp_request      # instance attribute: this client only

    def plan_batch(self, requests: list[tuple], device=None) -> None:
        """Announce every request of the coming batch at once (`dealer_plan.batch_requests`):
        the dealer works ahead; the gates' own announcements are then checked, not sent."""
        self.announce(requests, device)
        self.planned = True

    def end_batch(self) -> None:
        if self.planned and self.expected:
            raise RuntimeError(f"dealer plan out of step: {len(self.expected)} planned requests unused, "
                               f"next {self.expected[0][0]}")
        self.planned = False

    def announce(self, requests: list[tuple], device=None) -> None:
        """Ask for these (function, args[, kwargs]) answers now; they are read in order."""
        if self.planned:
            return                    # already announced with the batch plan
        full = [(r[0], r[1], r[2] if len(r) > 2 else {}) for r in requests]
        msgs = [{"function": f, "device": None if device is None else str(device), "args": args,
                 "kwargs": kwargs} for f, args, kwargs in full]
        self.comm.send_obj({"function": BATCH, "requests": msgs}, self.comm.get_ttp_rank(),
                           self.client.ttp_group)
        self.expected.extend((f, tuple(args), tuple(sorted(kwargs.items()))) for f, args, kwargs in full)

    def _ttp_request(self, func_name, device, *args, **kwargs):
        if device is not None:
            device = str(device)
        key = (func_name, tuple(args), tuple(sorted(kwargs.items())))
        if self.expected:
            want = self.expected.popleft()
            if want != key:
                raise RuntimeError(f"dealer requests out of step: announced {want}, asked {key}")
        else:
            request = {"function": func_name, "device": device, "args": args, "kwargs": kwargs}
            self.comm.send_obj({"function": BATCH, "requests": [request]}, self.comm.get_ttp_rank(),
                               self.client.ttp_group)
        result = torch.empty(result_size(func_name, args, kwargs), dtype=torch.long, device=device)
        self.comm.broadcast(result, self.comm.get_ttp_rank(), self.client.comm_group)
        return result


def result_size(func_name: str, args: tuple, kwargs: dict) -> torch.Size:
    """Size of the dealer's answer to a request (party 0 knows it without being told).

    Shape arithmetic by hand: evaluating the op on "meta" tensors would do, but its first
    use imports torch's meta registrations (seconds of CPU inside the timed batch).
    """
    if func_name == "binary":
        return _broadcast(args[0], args[1])
    if func_name in ("square", "wraps", "B2A"):
        return torch.Size(args[0])
    if func_name in ("trunc_pair", "relu_mask"):
        return torch.Size([2, *args[0]])
    if func_name == "cmp_mask":
        return torch.Size([sum(comparison_mask_words(int(torch.Size(args[0]).numel())))])
    if func_name == "weight_masks":
        return torch.Size([1])
    if func_name == "plain_product":
        return result_size("additive", args[1:], kwargs)
    if func_name != "additive":
        raise ValueError(f"unknown dealer function {func_name}")
    size0, size1, op, *rest = args
    if op == "mul":
        return _broadcast(size0, size1)
    if op == "matmul" and len(size0) == 2 and len(size1) == 2:
        return torch.Size([size0[0], size1[1]])
    if op == "conv2d" and not rest:
        n, _, h, w = size0
        c_out, _, kh, kw = size1
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        sh, sw = pair(kwargs.get("stride", 1))
        ph, pw = pair(kwargs.get("padding", 0))
        dh, dw = pair(kwargs.get("dilation", 1))
        return torch.Size([n, c_out, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                           (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1])
    a = torch.empty(size0, device="meta", dtype=torch.float32)   # anything else: slow but right
    b = torch.empty(size1, device="meta", dtype=torch.float32)
    return getattr(torch, op)(a, b, *rest, **kwargs).shape


def _broadcast(a, b) -> torch.Size:
    """torch.broadcast_shapes without its first-call import of sympy (~1 s)."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(y if x == 1 else x)
    return torch.Size(out)


#: message name of a batch of dealer requests
BATCH = "__batch__"


def size_triples_without_products() -> None:
    """Make CrypTen's TTP triples cost a party other than 0 no product.

    CrypTen 0.4.1's `TrustedThirdParty.generate_additive_triple` draws a, b and c from the
    party's generator, but on every party but 0 it first computes the whole product a * b
    (a convolution, for a convolution's triple) only to learn c's size ("TODO: Compute size
    without executing computation"): a quarter of the data owner's product work, thrown
    away. Here the size comes from `result_size`; the draws (a, b, then c, from the same
    generator, which the dealer mirrors) are unchanged. Idempotent.
    """
    import crypten.communicator as comm
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider import ttp_provider

    cls = ttp_provider.TrustedThirdParty
    if getattr(cls.generate_additive_triple, "_sized", False):
        return
    stock = cls.generate_additive_triple

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if comm.get().get_rank() == 0:
            return stock(self, size0, size1, op, device, *args, **kwargs)
        draw = ttp_provider.generate_random_ring_element      # the CSPRNG's, once installed
        generator = ttp_provider.TTPClient.get().get_generator(device=device)
        a = draw(size0, generator=generator, device=device)
        b = draw(size1, generator=generator, device=device)
        c = draw(result_size("additive", (size0, size1, op, *args), kwargs), generator=generator,
                 device=device)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    generate_additive_triple._sized = True
    cls.generate_additive_triple = generate_additive_triple


def serve_dealer() -> None:
    """CrypTen's TTPServer, answering `DealerClient`'s (batched) requests tensor-only."""
    import crypten
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPServer

    class BatchingTTPServer(TTPServer):
        def __init__(self) -> None:          # TTPServer.__init__ runs its own loop; this is ours
            crypten.init()
            self.ttp_group = comm.get().ttp_group
            self.comm_group = comm.get().ttp_comm_group
            self.device = "cpu"
            self._setup_generators()

        def trunc_pair(self, size, d):
            """Party 0's shares of (r >> d, MSB(r)) for r = r0 + r1 drawn from both parties'
            generators; party 1 draws its own shares of them (`truncation_pair_shares`)."""
            from crypten.mpc.provider import ttp_provider

            draw = ttp_provider.generate_random_ring_element
            g0, g1 = self._get_generators(device=self.device)[:2]
            r = draw(size, generator=g0) + draw(size, generator=g1)
            t, m = truncation_pair(r, d)
            t -= draw(size, generator=g1)
            m -= draw(size, generator=g1)
            return torch.stack([t, m])

        def relu_mask(self, size):
            """Party 0's (r_A, c) of a ReLU mask (`relu_mask_shares`): r = r_B0 xor r_B1 and
            a = a0 + a1 from both generators, c = a * r; party 1 draws its r_A and c."""
            from crypten.mpc.provider import ttp_provider

            ring, kbit = ttp_provider.generate_random_ring_element, ttp_provider.generate_kbit_random_tensor
            g0, g1 = self._get_generators(device=self.device)[:2]
            r = kbit(size, bitlength=1, generator=g0) ^ kbit(size, bitlength=1, generator=g1)
            a = ring(size, generator=g0) + ring(size, generator=g1)
            r_a = r - ring(size, generator=g1)
            c = a * r
            c -= ring(size, generator=g1)
            return torch.stack([r_a, c])

        def cmp_mask(self, size):
            """Party 0's XOR-shares of the bits of a comparison mask r = r0 + r1 (both parties'
            generators; `comparison_mask_shares`): its low NARROW_BITS bits, packed for the
            carry tree, and its bit NARROW_BITS; party 1 draws its own shares."""
            from crypten.mpc.provider import ttp_provider

            ring = ttp_provider.generate_random_ring_element
            g0, g1 = self._get_generators(device=self.device)[:2]
            r = ring(size, generator=g0) + ring(size, generator=g1)
            low = pack_low_bits(r.reshape(-1))
            top = pack_bits((r.reshape(-1) >> NARROW_BITS) & 1)
            low ^= ring(low.size(), generator=g1)
            top ^= ring(top.size(), generator=g1)
            return torch.cat([low, top])

        def weight_masks(self, sizes):
            """Draw the mask b of every plain weight from party 0's generator (party 0 draws the
            same); keep them for `plain_product`."""
            from crypten.mpc.provider import ttp_provider

            g0 = self._get_generators(device=self.device)[0]
            self.masks = [ttp_provider.generate_random_ring_element(sz, generator=g0) for sz in sizes]
            return torch.zeros(1, dtype=torch.long)

        def plain_product(self, index, size_x, size_w, op, **kwargs):
            """Party 0's share c0 = op(a, b) - c1 of a plain-weight product: a and c1 drawn
            from party 1's generator (party 1 draws the same), b the weight's mask."""
            from crypten.mpc.provider import ttp_provider

            draw = ttp_provider.generate_random_ring_element
            g1 = self._get_generators(device=self.device)[1]
            a = draw(size_x, generator=g1)
            c = _product_fn(op)(a, self.masks[index], **kwargs)
            c -= draw(c.size(), generator=g1)
            return c

        def serve(self) -> None:
            """Answer requests in order; a sender thread ships them, so the dealer computes
            the next answers while party 0 is still busy (at most QUEUE_BYTES ahead)."""
            ttp_rank = comm.get().get_ttp_rank()
            queue = _ByteBoundedQueue(QUEUE_BYTES)
            failure: list[BaseException] = []

            def ship() -> None:
                try:
                    while (result := queue.get()) is not None:
                        comm.get().broadcast(result, ttp_rank, self.comm_group)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the serving loop
                    failure.append(exc)
                    queue.close()

            sender = threading.Thread(target=ship, daemon=True, name="dealer-sender")
            sender.start()
            try:
                while True:
                    message = comm.get().recv_obj(0, self.ttp_group)
                    if message == "terminate":
                        return
                    for request in message["requests"]:
                        self.device = request["device"]
                        result = getattr(self, request["function"])(*request["args"], **request["kwargs"])
                        if not queue.put(result):
                            raise failure[0] if failure else RuntimeError("dealer sender stopped")
            finally:
                queue.put(None)
                sender.join(timeout=5)

    BatchingTTPServer().serve()


#: how far (bytes of answers not yet received by party 0) the dealer may run ahead
QUEUE_BYTES = 768 << 20


class _ByteBoundedQueue:
    """FIFO of tensors holding at most `limit` bytes (one larger item is always let in)."""

    def __init__(self, limit: int) -> None:
        from collections import deque

        self.limit, self.bytes, self.closed = limit, 0, False
        self.items: deque = deque()
        self.cond = threading.Condition()

    def put(self, item) -> bool:
        n = 0 if item is None else item.nelement() * item.element_size()
        with self.cond:
            while self.items and self.bytes + n > self.limit and not self.closed:
                self.cond.wait()
            if self.closed and item is not None:
                return False
            self.items.append(item)
            self.bytes += n
            self.cond.notify_all()
            return True

    def get(self):
        with self.cond:
            while not self.items:
                if self.closed:
                    return None
                self.cond.wait()
            item = self.items.popleft()
            if item is not None:
                self.bytes -= item.nelement() * item.element_size()
            self.cond.notify_all()
            return item

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


#: the public offset that makes a truncated value non-negative: y + 2^62 in [0, 2^63)
OFFSET = 1 << 62


def truncation_pair(r: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the dealer shares with a uniform mask r: (r >> d) logical, and MSB(r)."""
    return (r >> d) & ((1 << (64 - d)) - 1), (r >> 63) & 1


def truncation_pair_shares(size: torch.Size, d: int, rank: int, device=None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This party's arithmetic shares of a truncation pair (r, r >> d, MSB(r)) for masks r of
    `size`: drawn from the generator it shares with the dealer, except party 0's shares of
    r >> d and MSB(r), which the dealer sends (`serve_dealer`'s `trunc_pair`)."""
    from crypten.mpc.provider import ttp_provider

    client = ttp_provider.TTPClient.get()
    generator = client.get_generator(device=device)
    draw = ttp_provider.generate_random_ring_element     # the CSPRNG's, once installed
    r = draw(size, generator=generator, device=device)
    if rank == 0:
        tm = client.ttp_request("trunc_pair", device, size, d)
        return r, tm[0], tm[1]
    return r, draw(size, generator=generator, device=device), draw(size, generator=generator, device=device)


def truncate_from_opening(z: torch.Tensor, t: torch.Tensor, m: torch.Tensor, d: int, rank: int
                          ) -> torch.Tensor:
    """This party's share of floor(y / 2^d) (+0 or +1) from z = y + 2^62 + r (opened, mod 2^64)
    and its shares t of r >> d and m of MSB(r).

    With y' = y + 2^62 in [0, 2^63) and r uniform, y' + r = z + w * 2^64 with the wrap
    w = MSB(r) * (1 - MSB(z)) (r < 2^63 cannot wrap; r >= 2^63 wraps exactly when z < 2^63),
    which is linear in the shares of MSB(r) since z is public. So
    floor(y' / 2^d) = (z >> d) - (r >> d) + w * 2^(64-d) - [z mod 2^d < r mod 2^d], and the
    last (borrow) term, 0 or 1, is dropped: the result is floor(y / 2^d) or one ulp above.
    """
    keep = 1 - ((z >> 63) & 1)                 # public 1 - MSB(z)
    out = (m * keep) << (64 - d)
    out -= t
    if rank == 0:
        out += ((z >> d) & ((1 << (64 - d)) - 1)) - (OFFSET >> d)
    return out


class PlainWeight:
    """A product operand the model owner holds in clear (a convolution's or the classifier's
    weights, a "mul" scale), used by `TwoPartyGates.plain_product` instead of a sharing.

    On the model owner it carries the fixed-point encoding W; on the data owner the masked
    delta = W - b, b the dealer's uniform mask for this weight (known to the model owner and
    the dealer only), received once at setup. `index` names the weight to the dealer."""

    def __init__(self, index: int, op: str, size: torch.Size, value: torch.Tensor | None = None) -> None:
        self.index, self.op, self.size = index, op, torch.Size(size)
        self.value = value            # model owner: W; data owner: W - b (after `share_plain_weights`)


def _product_fn(op: str):
    from backends.mpc.ring import ring_conv2d, ring_matmul

    return {"conv2d": ring_conv2d, "matmul": ring_matmul, "mul": torch.mul}[op]


#: deliberately broken variants, for the leak tests only (MPC_PROTOCOL_FAULTS)
FAULTS = ("open_bits", "reuse_mask", "own_share", "unmasked_input", "unmasked_weights",
          "unmasked_compare")


class TwoPartyGates:
    """ReLU and exact truncation on CrypTen shares with the circuits above (two parties only)."""

    def __init__(self, crypten, dealer: DealerClient | None = None) -> None:
        import crypten.communicator as comm

        self.crypten = crypten
        self.comm = comm.get()
        self.rank = self.comm.get_rank()
        if self.comm.get_world_size() != 2:
            raise ValueError("TwoPartyGates is a two-party protocol")
        self.dealer = dealer          # party 0 with a dealer: announce each ReLU's triples
        self.provider = crypten.mpc.get_default_provider()   # fixed for the session
        #: tests only: this party's own input share of every gate call (its view), or None
        self.view: list[torch.Tensor] | None = None
        #: tests only: a deliberately broken variant (one of FAULTS) or "" for the real protocol
        self.fault = ""

    def _and(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:

        if len(xs) > 1 and all(t is xs[0] for t in xs[1:]):
            return self._and_shared(xs[0], ys)
        shapes = [x.shape for x in xs]
        z = self._beaver_and(torch.cat([t.reshape(-1) for t in xs]), torch.cat([t.reshape(-1) for t in ys]))
        out, start = [], 0
        for shape in shapes:
            k = int(torch.Size(shape).numel())
            out.append(z[start:start + k].view(shape))
            start += k
        return out

    def _and_shared(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """x & y for each y in ys with one opening of x: a triple (a, [b_k], [a & b_k]) whose a
        masks x once (the carry tree's p_hi & g_lo, p_hi & p_lo): 3 words opened, not 4."""

        shape = x.shape
        z = self._beaver_and(x.reshape(1, -1), torch.stack([t.reshape(-1) for t in ys]))
        return [z[k].view(shape) for k in range(len(ys))]

    def _beaver_and(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """XOR-shares of x & y (y may broadcast x) from one binary triple: one opening of
        (x ^ a, y ^ b), then z = c ^ (eps & b) ^ (a & delta) (^ eps & delta on party 0)."""
        import torch.distributed as dist

        a, b, c = self.provider.generate_binary_triple(x.size(), y.size(), device=x.device)
        a, b, c = a.share, b.share, c.share
        eps, delta = self.comm.all_reduce([x ^ a, y ^ b], op=dist.ReduceOp.BXOR, batched=True)
        z = c ^ (eps & b) ^ (a & delta)
        if self.rank == 0:
            z ^= eps & delta
        return z

    def product(self, op: str, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """This party's share of op(x, y) (op: conv2d, matmul or mul) for its int64 shares x, y:
        a Beaver product, not truncated.

        CrypTen computes [c] + eps * [b] + [a] * delta + eps * delta, three products on every
        party (the last one is kept by party 0 only). Since y = b + delta,
        x * y = c + a * delta + eps * y, so [z] = [c] + [a] * delta + eps * [y]: two products
        per party, with the same triple and the same one opening of (eps, delta)."""
        from backends.mpc.ring import ring_conv2d, ring_matmul

        fn = {"conv2d": ring_conv2d, "matmul": ring_matmul, "mul": torch.mul}[op]
        a, b, c = self.provider.generate_additive_triple(x.size(), y.size(), op, device=x.device, **kwargs)
        eps, delta = self.comm.all_reduce([x - a.share, y - b.share], batched=True)
        z = fn(a.share, delta, **kwargs)
        z += fn(eps, y, **kwargs)
        z += c.share
        return z

    def share_plain_weights(self, weights: list[PlainWeight]) -> None:
        """Setup: the model owner draws each weight's mask b (the dealer draws the same) and
        sends the data owner delta = W - b, once; b is uniform on Z_2^64, so delta is a
        one-time pad of W, and re-using it for every batch reveals nothing new."""
        from crypten.mpc.provider import ttp_provider

        sizes = [w.size for w in weights]
        n = sum(int(sz.numel()) for sz in sizes)
        if self.rank == 0:
            if self.dealer is not None:
                self.dealer.announce([("weight_masks", (sizes,))])
            ttp_provider.TTPClient.get().ttp_request("weight_masks", None, sizes)
            generator = ttp_provider.TTPClient.get().get_generator()
            draw = ttp_provider.generate_random_ring_element
            deltas = []
            for w in weights:
                b = draw(w.size, generator=generator)
                deltas.append((w.value - b).reshape(-1) if self.fault != "unmasked_weights"
                              else w.value.reshape(-1).clone())          # BROKEN: W - 0
            flat = torch.cat(deltas) if deltas else torch.zeros(0, dtype=torch.long)
        else:
            flat = torch.empty(n, dtype=torch.long)
        flat = self.comm.broadcast(flat, 0)
        if self.rank == 1:
            start = 0
            for w in weights:
                k = int(w.size.numel())
                w.value = flat[start:start + k].view(w.size)
                start += k

    def plain_product(self, x: torch.Tensor, weight: PlainWeight, **kwargs) -> torch.Tensor:
        """This party's share of op(x, W) for its int64 share x and the model owner's plain
        weight W (not truncated): one product per party instead of Beaver's two.

        The dealer gives the data owner (a, c1) and the model owner c0 with c0 + c1 = op(a, b);
        the data owner sends eps = x1 - a (a fresh per product: a one-time pad of x1), and
        op(x, W) = op(x0 + eps, W) + op(a, delta) + op(a, b), delta = W - b from setup:
        model owner  op(x0 + eps, W) + c0,   data owner  op(a, delta) + c1."""
        from crypten.mpc.provider import ttp_provider

        fn = _product_fn(weight.op)
        client = ttp_provider.TTPClient.get()
        if self.view is not None:
            self.view.append(x.reshape(-1).clone())
        if self.rank == 0:
            args = (weight.index, x.size(), weight.size, weight.op)
            if self.dealer is not None:
                self.dealer.announce([("plain_product", args, kwargs)], device=x.device)
            eps = self.comm.recv(torch.empty_like(x), 1)
            c = client.ttp_request("plain_product", x.device, *args, **kwargs)
            z = fn(x + eps, weight.value, **kwargs)
            z += c
            return z
        draw = ttp_provider.generate_random_ring_element
        generator = client.get_generator(device=x.device)
        a = draw(x.size(), generator=generator, device=x.device)
        eps = x - a if self.fault != "unmasked_input" else x.clone()     # BROKEN: x1 - 0
        sent = self.comm.isend(eps, 0)
        z = fn(a, weight.value, **kwargs)            # input-independent: overlaps the transfer
        z += draw(z.size(), generator=generator, device=x.device)
        sent.wait()
        return z

    def drelu_shares(self, share: torch.Tensor) -> torch.Tensor:
        """XOR-shares (0/1) of [x >= 0]."""
        msb = msb_shares(share.reshape(-1), self.rank, self._and)
        return msb ^ 1 if self.rank == 0 else msb

    def relu(self, x, narrow: bool = False):
        """relu(x) for an arithmetic MPCTensor x (any shape, any fixed-point scale).

        narrow (dealer only): the caller guarantees |x's encoding| < 2^NARROW_BITS (the model
        owner's calibrated bound, `plan.Calibration.comparison_bits`), so the sign comes from
        one opening and a 32-bit comparison instead of the 64-bit carry circuit."""
        if self.provider.NAME != "TTP":
            return self._relu_first_party(x)
        share = x.share
        flat = share.reshape(-1)
        if self.view is not None:
            self.view.append(flat.clone())
        n = flat.numel()
        if self.dealer is not None:
            self.dealer.announce(relu_triple_requests(n, narrow=narrow), device=share.device)
        d = self._narrow_drelu(flat) if narrow else self.drelu_shares(share)
        r_b, r_a, a, c = relu_mask_shares(torch.Size([n]), self.rank, share.device)
        if self.fault == "reuse_mask":                      # BROKEN: the same mask every evaluation
            a = torch.full_like(a, 0x5DEECE66D * (self.rank + 1))
        eps_part = flat - a
        if self.fault == "own_share" and self.rank == 1:    # BROKEN: sends its own share
            eps_part = flat
        # one message: the masked bit (packed, 32 per word) and the opening of x - a
        z_sum, eps = self.comm.all_reduce([pack_bit_pairs((d ^ r_b) & 1), eps_part], batched=True)
        z = unpack_bit_pairs(z_sum, n)                      # d xor r: uniformly random
        xr = c + eps * r_a                                  # shares of x * r
        out = z * flat + (1 - 2 * z) * xr                   # x * d, d = z xor r
        result = x.shallow_copy()
        result._tensor = x._tensor.shallow_copy()        # MPCTensor.shallow_copy shares _tensor
        result._tensor.share = out.view(share.shape)
        return result

    def _narrow_drelu(self, flat: torch.Tensor) -> torch.Tensor:
        """XOR-shares (0/1) of [y >= 0] for |y| < 2^k, k = NARROW_BITS, from a comparison mask r.

        The parties open c = y + 2^k + r (mod 2^64): uniform, r is fresh and uniform. With
        y' = y + 2^k in [0, 2^(k+1)), y' = (c - r) mod 2^(k+1), and y >= 0 exactly when bit k of
        y' is set: c_k xor r_k xor [c mod 2^k < r mod 2^k] (`borrow_shares`)."""
        n = flat.numel()
        r, rho_low, rho_top = comparison_mask_shares(torch.Size([n]), self.rank, flat.device)
        masked = flat + r if self.fault != "unmasked_compare" else flat.clone()   # BROKEN: unmasked
        if self.rank == 0:
            masked += 1 << NARROW_BITS
        (c,) = self.comm.all_reduce([masked], batched=True)
        d = borrow_shares(c, rho_low, self.rank, self._and) ^ unpack_bits(rho_top, n)
        if self.rank == 0:
            d ^= (c >> NARROW_BITS) & 1
        return d

    def _relu_first_party(self, x):
        """`relu` with CrypTen's trusted-first-party provider (a bit conversion and a Beaver
        multiplication in one message)."""
        share = x.share
        if self.view is not None:
            self.view.append(share.reshape(-1).clone())
        d = self.drelu_shares(share)
        n = d.numel()
        provider = self.provider
        r_a, r_b = provider.B2A_rng(torch.Size([n]), device=share.device)
        a, b, c = provider.generate_additive_triple(torch.Size([n]), torch.Size([n]), "mul",
                                                    device=share.device)
        flat = share.reshape(-1)
        z_bit = (d ^ r_b.share) & 1
        eps_part, b_share = flat - a.share, b.share
        if self.fault == "own_share" and self.rank == 1:    # BROKEN: sends its own share
            eps_part = flat
        if self.fault == "reuse_mask":                      # BROKEN: one mask for x and r_A
            b_share = a.share
        # one message: the masked bit and the Beaver openings for x * r_A
        z_sum, eps, delta = self.comm.all_reduce([z_bit, eps_part, r_a.share - b_share],
                                                 batched=True)
        z = z_sum & 1
        xr = c.share + eps * b.share + a.share * delta
        if self.rank == 0:
            xr += eps * delta
        out = z * flat + (1 - 2 * z) * xr
        result = x.shallow_copy()
        result._tensor = x._tensor.shallow_copy()        # MPCTensor.shallow_copy shares _tensor
        result._tensor.share = out.view(share.shape)
        return result

    def truncate(self, share: torch.Tensor, d: int) -> torch.Tensor:
        """This party's share of floor(y / 2^d) (within one ulp) for its int64 share of y:
        with a dealer, from a truncation pair (one opening); else by the carry circuit."""
        if self.provider.NAME == "TTP":
            return self._truncate_with_pair(share, d)
        return self._truncate_by_circuit(share, d)

    def _truncate_with_pair(self, share: torch.Tensor, d: int) -> torch.Tensor:
        """`truncate` from a dealer's truncation pair (see `truncation_pair`): one opening of
        n words, no circuit. Exact within one ulp for |y| < 2^62."""
        flat = share.reshape(-1)
        if self.view is not None:
            self.view.append(flat.clone())
        n = flat.numel()
        size = torch.Size([n])
        if self.dealer is not None:
            self.dealer.announce([("trunc_pair", (size, d))], device=share.device)
        r, t, m = truncation_pair_shares(size, d, self.rank, share.device)
        masked = flat + r if self.fault != "open_bits" else flat.clone()   # BROKEN: unmasked
        if self.rank == 0:
            masked += OFFSET
        (z,) = self.comm.all_reduce([masked], batched=True)      # y + 2^62 + r: uniformly random
        return truncate_from_opening(z, t, m, d, self.rank).view(share.shape)

    def _truncate_by_circuit(self, share: torch.Tensor, d: int) -> torch.Tensor:
        """`truncate` by the carry circuit (no dealer: CrypTen's trusted first party)."""
        if self.dealer is not None:
            self.dealer.announce(truncate_triple_requests(share.numel()), device=share.device)
        flat = share.reshape(-1)
        if self.view is not None:
            self.view.append(flat.clone())
        n = flat.numel()
        w, msb = wrap_msb_shares(flat, self.rank, self._and)
        r_a, r_b = self.provider.B2A_rng(torch.Size([2 * n]), device=share.device)
        import torch.distributed as dist

        mask = torch.zeros_like(r_b.share) if self.fault == "open_bits" else r_b.share   # BROKEN: unmasked
        masked = pack_bits((torch.cat([w, msb]) ^ mask) & 1)
        (z,) = self.comm.all_reduce([masked], op=dist.ReduceOp.BXOR, batched=True)
        z = unpack_bits(z, 2 * n)                         # opened w ^ r, msb ^ r: uniformly random
        bits = (1 - 2 * z) * r_a.share                    # arithmetic shares of w and msb
        if self.rank == 0:
            bits += z
        logical = (flat >> d) & ((1 << (64 - d)) - 1)
        out = logical - (bits[:n] + bits[n:]) * (1 << (64 - d))
        return out.view(share.shape)
