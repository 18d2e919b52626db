"""CKKS parameters for the `he` backend: defaults per mode, the 128-bit security check, and
the key material each party holds.

Security follows the HomomorphicEncryption.org standard (Albrecht et al., 2018/2021),
table for 128-bit classical security with a ternary secret: for ring degree N the total
coefficient modulus may have at most `MAX_COEFF_BITS_128[N]` bits. A larger modulus (or
a ring degree outside the table) is rejected unless the user passes `allow_insecure=true`.

TenSEAL (SEAL) treats the last prime of the chain as the special key-switching prime; it
counts towards the security budget like the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from suite.errors import SuiteError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secret.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
SECURITY_BITS = 128
STANDARD = "HomomorphicEncryption.org security standard (2018), 128-bit classical, ternary secret"


@dataclass(frozen=True)
class CKKSParams:
    """One CKKS parameter set: ring degree, modulus chain (bits per prime) and scale."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def total_bits(self) -> int:
        return int(sum(self.coeff_mod_bit_sizes))

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescalings available: primes between the first (output) prime and the special one."""
        return max(0, len(self.coeff_mod_bit_sizes) - 2)

    def is_secure(self) -> bool:
        limit = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        return limit is not None and self.total_bits <= limit

    def describe(self) -> str:
        chain = "/".join(str(b) for b in self.coeff_mod_bit_sizes)
        return (f"CKKS N={self.poly_modulus_degree}, coeff modulus {chain} bits "
                f"(total {self.total_bits}), scale 2^{self.scale_bits}")


# head: one plaintext-weight multiplication (depth 1), no rotations, no relinearisation.
# The special prime is never used for key switching, so it is kept small and the 109-bit
# budget of N=4096 goes to the data primes: 52-bit output prime (logits up to 2^15 in
# magnitude) and a 36-bit scale (CKKS error ~1e-5 on a logit).
HEAD_DEFAULT = CKKSParams(4096, (52, 36, 21), 36)
# cnn: conv (1 level), square (1), dense (1), output mask (1); rotations for the im2col
# convolution and the sums need a special prime at least as large as the scale primes.
CNN_DEFAULT = CKKSParams(8192, (43, 33, 33, 33, 33, 43), 33)
DEPTH_NEEDED = {"head": 1, "cnn": 4}


def resolve_params(mode: str, poly_modulus_degree: int, coeff_mod_bit_sizes, scale_bits: int,
                   allow_insecure: bool) -> CKKSParams:
    """Mode defaults overridden by options; insecure or unusable sets raise SuiteError."""
    default = HEAD_DEFAULT if mode == "head" else CNN_DEFAULT
    try:
        given = [float(b) for b in (coeff_mod_bit_sizes or ())]
    except (TypeError, ValueError):
        given = [0.5]
    if any(b != int(b) for b in given):
        raise SuiteError(f"he: coeff_mod_bit_sizes must be whole numbers of bits separated by '/', "
                         f"e.g. 52/36/21; got {coeff_mod_bit_sizes}")
    bits = tuple(int(b) for b in given) if given else default.coeff_mod_bit_sizes
    params = CKKSParams(int(poly_modulus_degree) or default.poly_modulus_degree, bits,
                        int(scale_bits) or default.scale_bits)
    check_params(params, mode, allow_insecure)
    return params


def check_params(params: CKKSParams, mode: str, allow_insecure: bool) -> None:
    n = params.poly_modulus_degree
    if n < 1024 or n & (n - 1):
        raise SuiteError(f"he: poly_modulus_degree must be a power of two >= 1024, got {n}")
    if any(b < 2 or b > 60 for b in params.coeff_mod_bit_sizes):
        raise SuiteError(f"he: every coefficient-modulus prime needs 2..60 bits, got "
                         f"{list(params.coeff_mod_bit_sizes)}")
    if not params.is_secure() and not allow_insecure:
        limit = MAX_COEFF_BITS_128.get(n)
        why = (f"total coefficient modulus {params.total_bits} bits exceeds {limit} bits"
               if limit is not None else f"N={n} is not in the standard's table")
        raise SuiteError(
            f"he: insecure CKKS parameters ({params.describe()}): {why}, the 128-bit limit for N={n} "
            f"in the {STANDARD} (limits: "
            + ", ".join(f"N={k}: {v}" for k, v in MAX_COEFF_BITS_128.items())
            + "); choose a larger poly_modulus_degree or fewer/smaller primes, "
              "or pass allow_insecure=true for experiments"
        )
    need = DEPTH_NEEDED[mode]
    if params.depth < need:
        raise SuiteError(
            f"he: mode '{mode}' needs {need} rescaling level(s), i.e. at least {need + 2} primes "
            f"(output prime, {need} scale prime(s), special prime); got {list(params.coeff_mod_bit_sizes)}"
        )
    if params.scale_bits >= params.coeff_mod_bit_sizes[0]:
        raise SuiteError(f"he: scale 2^{params.scale_bits} leaves no room for values in the "
                         f"{params.coeff_mod_bit_sizes[0]}-bit output prime")


def security_rows(params: CKKSParams) -> list[dict]:
    """The parameter set as result rows, so the leaderboard data carries it."""
    note = f"{STANDARD}; {params.describe()}"
    secure = params.is_secure()
    return [
        _row("ckks_poly_modulus_degree", params.poly_modulus_degree, "", None, note),
        _row("ckks_coeff_modulus_bits", params.total_bits, "bits", None,
             f"primes {'/'.join(map(str, params.coeff_mod_bit_sizes))}; limit "
             f"{MAX_COEFF_BITS_128.get(params.poly_modulus_degree)} bits for 128-bit security"),
        _row("ckks_scale_bits", params.scale_bits, "bits", None, "global scale 2^bits"),
        _row("ckks_security_bits", SECURITY_BITS if secure else 0, "bits", True,
             note if secure else "INSECURE parameter set (allow_insecure=true): below 128-bit"),
        _row("ckks_slots", params.slots, "slots", None, "values per ciphertext (N/2)"),
    ]


def _row(metric: str, value, unit: str, higher_is_better, note: str | None = None) -> dict:
    out = {"metric": metric, "value": value, "unit": unit, "higher_is_better": higher_is_better}
    if note:
        out["note"] = note
    return out


# ------------------------------------------------------------------ contexts and keys

def private_context(params: CKKSParams, galois: bool):
    """The data owner's context: holds the secret key. Relinearisation keys are always
    generated by TenSEAL; Galois (rotation) keys only when the mode rotates."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, -1,
                     list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.scale_bits
    if galois:
        ctx.generate_galois_keys()
    return ctx


def public_context_bytes(ctx, galois: bool, relin: bool) -> bytes:
    """What the data owner sends the model owner: no secret key, only the keys it needs."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=galois,
                         save_relin_keys=relin)


def receive_public_context(blob: bytes):
    """The model owner's side: deserialise, drop any secret key, and prove none is left."""
    import tenseal as ts

    ctx = ts.context_from(blob)
    ctx.make_context_public()
    if ctx.is_private():
        raise RuntimeError("model owner's context still holds a secret key")
    return ctx


def key_sizes(ctx, galois: bool, relin: bool) -> dict[str, int]:
    """Serialised sizes of each kind of key material (bytes), measured by difference."""
    def size(**kw) -> int:
        base = dict(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                    save_relin_keys=False)
        return len(ctx.serialize(**{**base, **kw}))

    bare = size()
    return {
        "context_parameters_bytes": bare,
        "public_key_bytes": size(save_public_key=True) - bare,
        "relin_keys_bytes": (size(save_relin_keys=True) - bare) if relin else 0,
        "galois_keys_bytes": (size(save_galois_keys=True) - bare) if galois else 0,
        "secret_key_bytes": size(save_secret_key=True) - bare,
    }


def pack_message(parts: list[bytes]) -> bytes:
    """Frame serialised ciphertexts as one message: count, then (length, bytes) each."""
    out = [len(parts).to_bytes(4, "little")]
    for p in parts:
        out += [len(p).to_bytes(8, "little"), p]
    return b"".join(out)


def unpack_message(message: bytes) -> list[bytes]:
    n = int.from_bytes(message[:4], "little")
    parts, pos = [], 4
    for _ in range(n):
        size = int.from_bytes(message[pos:pos + 8], "little")
        parts.append(message[pos + 8:pos + 8 + size])
        pos += 8 + size
    if pos != len(message):
        raise ValueError("malformed message: trailing bytes")
    return parts
