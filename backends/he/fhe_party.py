"""The whole-network FHE engine's two parties, run from `.venv-fhe/` (numpy + desilofhe, no torch).

  data owner   creates every key (secret key kept), writes the evaluation keys (public,
               relinearisation, conjugation, rotation, small bootstrapping key) for the model
               owner, encrypts its packed image, decrypts the returned logits.
  model owner  reads those evaluation keys (never a secret key) and its compiled `Program`,
               and evaluates the whole program on the ciphertext: linear ops as
               baby-step giant-step diagonal products, the polynomial ReLU, and a CKKS
               bootstrap whenever a ciphertext has too few levels for the next step.

Both live in this one process and exchange only bytes (serialised keys and ciphertexts),
every one of which is counted. `python -m backends.he.fhe_party 0 FD` is started by
`backends.he.fhe_engine` over a socketpair (see `backends.mpc.party_process`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.he.fhe_eval import Evaluator, predict_counts

#: levels a ciphertext has after desilofhe's bootstrap (Engine(bootstrap=True)), per key option:
#: 17 (its max level) with small+roll, measured by backends.he.fhe_primitives
#: (`level_after_bootstrap`); an option not listed is unmeasured: the data owner then encrypts
#: at the max level and no pass is planned ahead
BOOTSTRAP_LEVELS: dict[str, int] = {"small+roll": 17}
BOOTSTRAP_LEVEL: int | None = BOOTSTRAP_LEVELS["small+roll"]
from backends.he.fhe_program import Program


def engine_version() -> str:
    from importlib.metadata import version

    return version("desilofhe")


#: how the model owner bootstraps and rotates (`fhe_bootstrap_keys` measured each option):
#:   full-SIZE   desilofhe's full bootstrap key (its fixed rotation keys, stages pre-encoded),
#:               SIZE medium | large (2.0.0 refuses "small"); the program's rotations use it too
#:               (untested here: > 14 GB resident while the key is made)
#:   small+roll  the small bootstrap key with the general roll key (rotations with the roll key)
KEY_OPTIONS = ("small+roll", "full-medium", "full-large")
DEFAULT_KEYS = "small+roll"


class DataOwner:
    """Holds the secret key; everything it hands out is public or evaluation key material."""

    def __init__(self, threads: int, mode: str = "cpu") -> None:
        import desilofhe

        self.engine = desilofhe.Engine(mode=mode, bootstrap=True, thread_count=threads)
        e = self.engine
        self.secret_key = e.create_secret_key()           # desilofhe samples it from its CSPRNG
        self.public_key = e.create_public_key(self.secret_key)

    def write_evaluation_keys(self, folder: Path, keys: str = DEFAULT_KEYS) -> dict[str, int]:
        """Create the evaluation keys `keys` names, write them for the model owner, drop our
        copies. Returns bytes per key file (what crosses to the model owner at setup)."""
        if keys not in KEY_OPTIONS:
            raise ValueError(f"fhe keys {keys!r}: use one of {KEY_OPTIONS}")
        e, sk = self.engine, self.secret_key
        folder.mkdir(parents=True, exist_ok=True)
        makers = [("public", lambda: self.public_key, e.write_public_key),
                  ("relinearization", lambda: e.create_relinearization_key(sk), e.write_relinearization_key),
                  ("conjugation", lambda: e.create_conjugation_key(sk), e.write_conjugation_key)]
        if keys == "small+roll":
            makers += [("rotation", lambda: e.create_roll_key(sk), e.write_roll_key),
                       ("small_bootstrap", lambda: e.create_small_bootstrap_key(sk), e.write_small_bootstrap_key)]
        else:
            size = keys.split("-", 1)[1]
            makers += [("bootstrap", lambda: e.create_bootstrap_key(sk, size=size), e.write_bootstrap_key)]
        sizes = {}
        for name, make, write in makers:
            key = make()
            path = folder / f"{name}.key"
            write(key, str(path))
            sizes[name] = path.stat().st_size
            del key
        return sizes

    def encrypt(self, vector: np.ndarray, level: int | None = None) -> bytes:
        """A fresh ciphertext of `vector`, at `level` when given (the model owner's public
        choice: the lowest level its first layers need, a smaller upload)."""
        v = np.zeros(self.engine.slot_count)
        v[: len(vector)] = vector
        e = self.engine
        ct = e.encrypt(v, self.public_key) if level is None else e.encrypt(v, self.public_key, int(level))
        return bytes(e.serialize_ciphertext(ct))

    def decrypt(self, blob: bytes, n: int) -> np.ndarray:
        ct = self.engine.deserialize_ciphertext(blob)
        return np.asarray(self.engine.decrypt(ct, self.secret_key))[:n].copy()


class DesiloCKKS:
    """desilofhe behind the evaluator's `CKKS` interface, with evaluation keys only.
    rotation_key: a RollKey or the BootstrapKey (desilofhe's roll overloads take either; the
    BootstrapKey path has not run here: its key does not fit this machine's memory);
    bootstrap_keys: what `Engine.bootstrap` takes after the relinearisation and conjugation
    keys, (bootstrap_key,) or (roll_key, small_bootstrap_key)."""

    def __init__(self, engine, relinearization_key, conjugation_key, rotation_key, bootstrap_keys=()) -> None:
        self.e, self.rk, self.ck, self.roll = engine, relinearization_key, conjugation_key, rotation_key
        self.boot_keys = tuple(bootstrap_keys)
        self.slots = engine.slot_count

    def level(self, ct) -> int:
        return ct.level

    def rotate_many(self, ct, shifts):
        # desilofhe's roll moves slot i to i + shift; the evaluator wants slot i <- slot i + d
        return self.e.roll_many(ct, self.roll, [(-d) % self.slots for d in shifts])

    def rotate(self, ct, shift):
        return self.e.roll(ct, self.roll, (-shift) % self.slots)

    def mul_plain(self, ct, vector):
        return self.e.multiply(ct, vector)

    def mul_const(self, ct, c):
        return self.e.multiply(ct, c)

    def mul(self, a, b):
        return self.e.multiply(a, b, self.rk)

    def add(self, a, b):
        return self.e.add(a, b)

    def sub(self, a, b):
        return self.e.subtract(a, b)

    def add_plain(self, ct, vector):
        return self.e.add(ct, vector)

    def level_down(self, ct, level):
        return self.e.level_down(ct, level)

    def odd_poly(self, x, coeffs):
        """c1 x + c3 x^3 + c5 x^5 + c7 x^7 in 3 levels: (c1 x + c3 x * x^2) + (c5 x + c7 x * x^2) * x^4,
        every product's operands one level apart at most (evaluate_polynomial takes 4)."""
        e, rk = self.e, self.rk
        c1, c3, c5, c7 = coeffs
        x2 = e.multiply(x, x, rk)                                   # L-1
        x4 = e.multiply(x2, x2, rk)                                 # L-2
        lo = e.add(e.level_down(e.multiply(x, c1), x4.level), e.multiply(e.multiply(x, c3), x2, rk))
        hi = e.add(e.level_down(e.multiply(x, c5), x4.level), e.multiply(e.multiply(x, c7), x2, rk))
        return e.add(e.level_down(lo, x4.level - 1), e.multiply(hi, x4, rk))   # L-3

    def bootstrap(self, ct):
        return self.e.bootstrap(self.e.intt(ct), self.rk, self.ck, *self.boot_keys)


class ModelOwner:
    """Evaluates the program on ciphertexts with evaluation keys only (`backends.he.fhe_eval`)."""

    def __init__(self, program: Program, key_folder: Path, threads: int, progress=None,
                 mode: str = "cpu", keys: str = DEFAULT_KEYS) -> None:
        import desilofhe

        self.engine = e = desilofhe.Engine(mode=mode, bootstrap=True, thread_count=threads)
        rk = e.read_relinearization_key(str(key_folder / "relinearization.key"))
        ck = e.read_conjugation_key(str(key_folder / "conjugation.key"))
        if keys != "small+roll":
            bk = e.read_bootstrap_key(str(key_folder / "bootstrap.key"))
            ckks = DesiloCKKS(e, rk, ck, bk, (bk,))
        else:
            roll = e.read_roll_key(str(key_folder / "rotation.key"))
            ckks = DesiloCKKS(e, rk, ck, roll, (roll, e.read_small_bootstrap_key(str(key_folder / "small_bootstrap.key"))))
        self.program = program
        self.evaluator = Evaluator(program, ckks, progress)

    @property
    def stats(self) -> dict[str, Any]:
        return self.evaluator.stats

    def handle(self, request: bytes) -> bytes:
        e = self.engine
        return bytes(e.serialize_ciphertext(self.evaluator.run(e.deserialize_ciphertext(request))))


def stderr_progress(step: int, total: int, name: str, took: float, stats: dict[str, Any]) -> None:
    """One line per op on stderr (the worker's log): an encrypted pass takes many minutes."""
    print(f"fhe model owner: op {step}/{total} {name} {took:.1f} s (bootstraps so far "
          f"{stats.get('bootstraps', 0)})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- process

def _peak_rss() -> int:
    from backends.mpc.party_process import peak_rss_bytes

    return peak_rss_bytes()


def serve(conn, settings: dict[str, Any]) -> None:
    from backends.mpc.party_process import recv, send

    threads = int(settings.get("threads", 2))
    mode, keys = settings.get("mode", "cpu"), settings.get("keys", DEFAULT_KEYS)
    workdir = Path(settings["workdir"])
    program = Program.from_bytes(Path(settings["program"]).read_bytes())
    t0 = time.perf_counter()
    owner = DataOwner(threads, mode)
    t1 = time.perf_counter()
    key_sizes = owner.write_evaluation_keys(workdir / "keys", keys)
    t2 = time.perf_counter()
    server = ModelOwner(program, workdir / "keys", threads, stderr_progress, mode, keys)
    t3 = time.perf_counter()
    plan = {"input_level": None}
    if keys in BOOTSTRAP_LEVELS:
        plan = predict_counts(program, owner.engine.max_level, BOOTSTRAP_LEVELS[keys])
    send(conn, {"ok": True, "keys": key_sizes, "engine_s": t1 - t0, "keygen_s": t2 - t1,
                "load_s": t3 - t2, "slots": owner.engine.slot_count, "max_level": owner.engine.max_level,
                "version": engine_version(), "peak_rss": _peak_rss(), "plan": plan})
    while True:
        msg = recv(conn)
        if msg[0] == "stop":
            send(conn, {"ok": True})
            return
        if msg[0] == "infer":
            out = []
            for vec in msg[1]:
                a = time.perf_counter()
                request = owner.encrypt(np.asarray(vec, np.float64), plan["input_level"])
                b = time.perf_counter()
                response = server.handle(request)
                c = time.perf_counter()
                logits = owner.decrypt(response, program.n_labels)
                d = time.perf_counter()
                out.append({"logits": logits.tolist(), "up": len(request), "down": len(response),
                            "encrypt_s": b - a, "eval_s": c - b, "decrypt_s": d - c,
                            **{k: v for k, v in server.stats.items()}})
            send(conn, {"ok": True, "images": out, "peak_rss": _peak_rss()})


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    from backends.mpc.party_process import recv, send, watch_parent

    conn = Connection(int(argv[2]))
    watch_parent(os.getppid())
    settings = recv(conn)
    try:
        serve(conn, settings)
    except Exception as exc:  # reported to the worker as one line, then exit non-zero
        send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
