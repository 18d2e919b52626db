"""Seconds per CKKS primitive at the engine's parameters, measured on this machine.

Run from `.venv-fhe/` (desilofhe, no torch):
    .venv-fhe/bin/python -m backends.he.fhe_primitives [--threads 2] [--json out.json]
It times one of each primitive the whole-network engine uses (key generation per key,
encrypt, plaintext-ciphertext products with and without a pre-encoded plaintext, rescale,
rotation with the engine's rotation key (`--keys`: the full bootstrap key, or the general
roll key) and with a fixed one-shift key, relinearised product, one degree-7 polynomial stage
as the engine evaluates it, one bootstrap), the key and ciphertext sizes, and the levels.
`backends.he.fhe_estimate.predict_pass` multiplies these by a compiled program's op
counts: the result is an estimate (labelled so), not a measured pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, repeat: int = 1):
    """(result of the last call, median seconds over `repeat` calls)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def measure_bootstrap(threads: int = 2, log=print) -> dict:
    """Only what a bootstrap needs (keys, one level-3 ciphertext) and one bootstrap: on a
    loaded machine the full measurement may not reach it."""
    import desilofhe

    res = _Logged(log)
    e = desilofhe.Engine(mode="cpu", bootstrap=True, thread_count=threads)
    res["slots"], res["max_level"] = e.slot_count, e.max_level
    sk = e.create_secret_key()
    pk = e.create_public_key(sk)
    rk, ck, sbk = e.create_relinearization_key(sk), e.create_conjugation_key(sk), e.create_small_bootstrap_key(sk)
    roll, res["keygen_roll_s"] = _timed(lambda: e.create_roll_key(sk))
    v = np.random.default_rng(0).uniform(-0.5, 0.5, e.slot_count)
    low = e.level_down(e.encrypt(v, pk), 3)
    boot, res["bootstrap_s"] = _timed(lambda: e.bootstrap(low, rk, ck, roll, sbk), 1)
    res["level_after_bootstrap"] = boot.level
    res["bootstrap_max_abs_err"] = float(np.abs(np.asarray(e.decrypt(boot, sk)) - v).max())
    return dict(res)


def measure(threads: int = 2, repeat: int = 3, full_roll_key: bool = True, log=print,
            keys: str = "small+roll") -> dict:
    """full_roll_key: also the rotation key the engine's `keys` option rotates with (the
    bootstrap key, or the general roll key for small+roll), its rotations and one bootstrap."""
    import desilofhe

    from backends.he.fhe_party import DesiloCKKS
    from backends.he.fhe_program import F3

    res = _Logged(log)
    res.update({"threads": threads, "estimate": "measured per primitive"})
    e, res["engine_s"] = _timed(lambda: desilofhe.Engine(mode="cpu", bootstrap=True, thread_count=threads))
    res["slots"], res["max_level"] = e.slot_count, e.max_level
    sk, res["keygen_secret_s"] = _timed(lambda: e.create_secret_key())
    pk, res["keygen_public_s"] = _timed(lambda: e.create_public_key(sk))
    rk, res["keygen_relinearization_s"] = _timed(lambda: e.create_relinearization_key(sk))
    ck, res["keygen_conjugation_s"] = _timed(lambda: e.create_conjugation_key(sk))
    fk, res["keygen_fixed_roll_s"] = _timed(lambda: e.create_fixed_roll_key(sk, -37))
    sbk, res["keygen_small_bootstrap_s"] = _timed(lambda: e.create_small_bootstrap_key(sk))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, key, write in (("public", pk, e.write_public_key), ("relinearization", rk, e.write_relinearization_key),
                                 ("conjugation", ck, e.write_conjugation_key), ("fixed_roll", fk, e.write_fixed_roll_key),
                                 ("small_bootstrap", sbk, e.write_small_bootstrap_key)):
            p = Path(tmp) / name
            write(key, str(p))
            sizes[name] = p.stat().st_size
    res["key_bytes"] = sizes
    rng = np.random.default_rng(0)
    v = rng.uniform(-0.5, 0.5, e.slot_count)
    w = rng.uniform(-0.5, 0.5, e.slot_count)
    ct, res["encrypt_s"] = _timed(lambda: e.encrypt(v, pk), repeat)
    res["ciphertext_bytes_max_level"] = len(bytes(e.serialize_ciphertext(ct)))
    res["ct_level_fresh"] = ct.level
    pt, res["encode_s"] = _timed(lambda: e.encode(w, ct.level), repeat)
    _, res["plain_mult_array_s"] = _timed(lambda: e.multiply(ct, w), repeat)
    prod, res["plain_mult_encoded_s"] = _timed(lambda: e.multiply(ct, pt), repeat)
    res["level_after_plain_mult"] = prod.level
    _, res["add_s"] = _timed(lambda: e.add(ct, ct), repeat)
    _, res["intt_s"] = _timed(lambda: e.intt(prod), repeat)
    _, res["fixed_roll_s"] = _timed(lambda: e.roll(ct, fk), repeat)
    _, res["ct_mult_relin_s"] = _timed(lambda: e.multiply(ct, ct, rk), repeat)
    poly, res["poly7_s"] = _timed(lambda: DesiloCKKS(e, rk, ck, None).odd_poly(ct, list(F3)), 1)
    res["poly7_levels"] = ct.level - poly.level          # the engine's depth-3 stage
    coeffs = [0.0, F3[0], 0.0, F3[1], 0.0, F3[2], 0.0, F3[3]]
    poly, res["poly7_library_s"] = _timed(lambda: e.evaluate_polynomial(ct, coeffs, rk), 1)
    res["poly7_library_levels"] = ct.level - poly.level
    low = e.level_down(ct, 3)
    res["ciphertext_bytes_level3"] = len(bytes(e.serialize_ciphertext(low)))
    if full_roll_key:
        res["keys"] = keys
        if keys == "small+roll":
            roll, res["keygen_roll_s"] = _timed(lambda: e.create_roll_key(sk))
            boot_keys = (roll, sbk)
        else:
            roll, res["keygen_bootstrap_s"] = _timed(lambda: e.create_bootstrap_key(sk, size=keys.split("-", 1)[1]))
            boot_keys = (roll,)
        res["rotation_key_bytes"] = int(roll.serialized_nbytes)
        _, res["roll_general_s"] = _timed(lambda: e.roll(ct, roll, 37), repeat)
        _, res["roll_general_pow2_s"] = _timed(lambda: e.roll(ct, roll, 64), repeat)
        _, res["roll_general_low_level_s"] = _timed(lambda: e.roll(low, roll, 37), repeat)
        shifts = [1, 2, 3, 5, 7, 11, 13, 37]
        _, t = _timed(lambda: e.roll_many(ct, roll, shifts), 1)
        res["roll_many_per_shift_s"] = t / len(shifts)
        boot, res["bootstrap_s"] = _timed(lambda: e.bootstrap(low, rk, ck, *boot_keys), 1)
        res["level_after_bootstrap"] = boot.level
        err = np.abs(np.asarray(e.decrypt(boot, sk)) - v).max()
        res["bootstrap_max_abs_err"] = float(err)
    return dict(res)


class _Logged(dict):
    """A result dict that reports every figure as soon as it is measured (long runs get killed)."""

    def __init__(self, log) -> None:
        super().__init__()
        self.log = log

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.log(f"{key}: {value}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-roll-key", action="store_true", help="skip the general roll key and the bootstrap")
    ap.add_argument("--bootstrap-only", action="store_true", help="only the keys a bootstrap needs and one bootstrap")
    ap.add_argument("--keys", default="small+roll", help="bootstrap / rotation keys (fhe_party.KEY_OPTIONS)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    res = measure_bootstrap(a.threads, log) if a.bootstrap_only else measure(a.threads, a.repeat, not a.no_roll_key, log, a.keys)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
