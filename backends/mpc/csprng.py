"""Cryptographically secure randomness for every random value on the CrypTen path.

CrypTen 0.4.1 draws shares, masks, zero-sharing seeds and Beaver triples from
`torch.Generator`, i.e. MT19937: 624 observed 32-bit outputs give its whole state and every
later draw. Our two-party gates open values in which one party's triple share appears
unmasked (a one-time pad on zero), so with MT19937 a curious party rebuilds the other's
stream, then its shares, then its secret (tests/test_mpc_rng_attacks.py does exactly that).

`KeystreamGenerator` is AES-256 in counter mode from `cryptography` (OpenSSL, AES-NI),
keyed with 32 bytes from `os.urandom`: a party's draws are the keystream read as words, in
large vectorised blocks (one `update_into` per MiB), so two parties holding the same key draw
the same values in the same order, as CrypTen's shared generators require. Each key drives
exactly one stream (the counter starts at zero; keys are never reused).

`install(crypten)` replaces, once, after CrypTen is imported (`crypten_compat.import_crypten`
is the only caller, so no code path runs CrypTen without it):
  * `crypten.common.rng.generate_random_ring_element` / `generate_kbit_random_tensor`, in
    every CrypTen module that imported them, by versions that draw from a KeystreamGenerator
    (and fall back to torch only when handed a `torch.Generator`, i.e. with `rng=torch`);
  * `crypten._setup_prng`: the pairwise ("prev"/"next"), "local" and "global" keys are 256
    bits from os.urandom, exchanged like CrypTen's 64-bit seeds (same messages, 4 words each);
  * the dealer's `TTPServer._setup_generators` (seeds came from torch's *default* generator)
    and `TTPClient._setup_generators`: one fresh 256-bit key per party.
Which generator is used is chosen by `set_mode("csprng" | "torch")` before `crypten.init()`;
"torch" is CrypTen's stock behaviour, kept only to measure the CSPRNG's cost, and its rows
say "insecure randomness".
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32                     # AES-256
KEY_WORDS = KEY_BYTES // 8         # a key travels as an int64 tensor of 4 words
MODES = ("csprng", "torch")
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_state = {"mode": "csprng", "installed": False}


class KeystreamGenerator:
    """A stream of uniformly random 64-bit words: AES-256-CTR keystream under a 256-bit key."""

    def __init__(self, key: bytes, device: Any = "cpu") -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"KeystreamGenerator needs a {KEY_BYTES}-byte key, got {len(key)} bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.device = torch.device(device)

    def random_bytes(self, n: int) -> np.ndarray:
        """The next n bytes of the stream as a uint8 array."""
        out = np.empty(n + 16, dtype=np.uint8)
        view = memoryview(out)
        done = 0
        while done < n:
            k = min(_CHUNK, n - done)
            self._encryptor.update_into(memoryview(_ZEROS)[:k], view[done:done + k + 15])
            done += k
        return out[:n]

    def words(self, size) -> torch.Tensor:
        """Uniform int64 over the whole ring Z_2^64 (read as signed)."""
        shape = _shape(size)
        n = int(np.prod(shape, dtype=np.int64))
        return torch.from_numpy(self.random_bytes(8 * n).view(np.int64).reshape(shape))

    def kbit(self, size, bits: int) -> torch.Tensor:
        """Uniform integers in [0, 2^bits) as int64 (one byte per value when bits <= 8)."""
        if not 1 <= bits <= 64:
            raise ValueError(f"bit length must be in [1, 64], got {bits}")
        if bits == 64:
            return self.words(size)
        shape = _shape(size)
        n = int(np.prod(shape, dtype=np.int64))
        if bits <= 8:
            raw = torch.from_numpy(self.random_bytes(n).reshape(shape)).to(torch.long)
        else:
            raw = torch.from_numpy(self.random_bytes(8 * n).view(np.int64).reshape(shape))
        return raw & ((1 << bits) - 1)


def _shape(size) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,)
    return tuple(int(s) for s in size)


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_to_tensor(key: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(key, dtype=np.int64).copy())


def tensor_to_key(t: torch.Tensor) -> bytes:
    return t.to(torch.long).numpy().astype(np.int64).tobytes()


def set_mode(mode: str) -> None:
    """Choose the generator for the next `crypten.init()` in this process."""
    if mode not in MODES:
        raise ValueError(f"mpc option rng must be one of {', '.join(MODES)}, got '{mode}'")
    _state["mode"] = mode


def mode() -> str:
    return _state["mode"]


# ------------------------------------------------------------------ CrypTen patches

def install(crypten: Any) -> None:
    """Route CrypTen's randomness through KeystreamGenerator (idempotent)."""
    if _state["installed"]:
        return
    import sys

    import crypten.common.rng as rng
    from crypten.mpc.provider import ttp_provider

    stock_ring, stock_kbit = rng.generate_random_ring_element, rng.generate_kbit_random_tensor

    def _default(generator, kwargs):
        if generator is not None:
            return generator
        device = kwargs.get("device") or torch.device("cpu")
        return crypten.generators["local"][torch.device(device)]

    def generate_random_ring_element(size, ring_size=(2 ** 64), generator=None, **kwargs):
        generator = _default(generator, kwargs)
        if not isinstance(generator, KeystreamGenerator):
            return stock_ring(size, ring_size=ring_size, generator=generator, **kwargs)
        if ring_size != 2 ** 64:
            raise ValueError(f"the CSPRNG draws ring elements of Z_2^64 only, asked for ring {ring_size}")
        return _to_device(generator.words(size), kwargs.get("device"))

    def generate_kbit_random_tensor(size, bitlength=None, generator=None, **kwargs):
        generator = _default(generator, kwargs)
        if not isinstance(generator, KeystreamGenerator):
            return stock_kbit(size, bitlength=bitlength, generator=generator, **kwargs)
        return _to_device(generator.kbit(size, 64 if bitlength is None else int(bitlength)),
                          kwargs.get("device"))

    for name, module in list(sys.modules.items()):
        if name == "crypten" or name.startswith("crypten."):
            if getattr(module, "generate_random_ring_element", None) is stock_ring:
                module.generate_random_ring_element = generate_random_ring_element
            if getattr(module, "generate_kbit_random_tensor", None) is stock_kbit:
                module.generate_kbit_random_tensor = generate_kbit_random_tensor

    stock_setup = crypten._setup_prng

    def _setup_prng():
        if _state["mode"] == "torch":
            return stock_setup()
        _setup_keys(crypten)

    crypten._setup_prng = _setup_prng

    server, client = ttp_provider.TTPServer, ttp_provider.TTPClient._TTPClient__TTPClient
    stock_server, stock_client = server._setup_generators, client._setup_generators

    def server_setup(self):
        if _state["mode"] == "torch":
            return stock_server(self)
        _dealer_keys(self)

    def client_setup(self):
        if _state["mode"] == "torch":
            return stock_client(self)
        _client_key(self)

    server._setup_generators = server_setup
    client._setup_generators = client_setup
    _state["installed"] = True


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    if device is None or torch.device(device).type == "cpu":
        return t
    from crypten.cuda import CUDALongTensor

    return CUDALongTensor(t.to(device))


def _setup_keys(crypten: Any) -> None:
    """CrypTen's seed exchange with 256-bit keys: send "next" to the next party, receive
    "prev" from the previous one, party 0 broadcasts "global"; "local" stays here."""
    comm = crypten.communicator.get()
    next_key, local_key, global_key = new_key(), new_key(), new_key()
    world, rank = comm.get_world_size(), comm.get_rank()
    if world >= 2:
        prev = torch.zeros(KEY_WORDS, dtype=torch.long)
        nxt = (rank + 1) % world
        reqs = [comm.isend(key_to_tensor(next_key), nxt), comm.irecv(prev, src=(nxt - 2) % world)]
        for req in reqs:
            req.wait()
        prev_key = tensor_to_key(prev)
    else:
        prev_key = next_key
    global_key = tensor_to_key(comm.broadcast(key_to_tensor(global_key), 0))
    cpu = torch.device("cpu")
    gens = crypten.generators
    for name in gens:
        gens[name].clear()           # no stock generator left behind (cuda entries included)
    gens["prev"][cpu] = KeystreamGenerator(prev_key)
    gens["next"][cpu] = KeystreamGenerator(next_key)
    gens["local"][cpu] = KeystreamGenerator(local_key)
    gens["global"][cpu] = KeystreamGenerator(global_key)


def _dealer_keys(server: Any) -> None:
    """The dealer: one fresh 256-bit key per party, sent to that party only."""
    import crypten.communicator as comm
    import torch.distributed as dist

    world = comm.get().get_world_size()
    keys = [new_key() for _ in range(world)]
    tensors = [key_to_tensor(k) for k in keys]
    reqs = [dist.isend(tensor=tensors[i], dst=i, group=server.ttp_group) for i in range(world)]
    server.generators = [KeystreamGenerator(k) for k in keys]
    server.generators_cuda = [None] * world
    for req in reqs:
        req.wait()
    dist.barrier(group=server.ttp_group)


def _client_key(client: Any) -> None:
    """A party: receive its key from the dealer."""
    import crypten.communicator as comm
    import torch.distributed as dist

    key = torch.zeros(KEY_WORDS, dtype=torch.long)
    dist.irecv(tensor=key, src=comm.get().get_ttp_rank(), group=client.ttp_group).wait()
    dist.barrier(group=client.ttp_group)
    client.generator = KeystreamGenerator(tensor_to_key(key))
    client.generator_cuda = None
