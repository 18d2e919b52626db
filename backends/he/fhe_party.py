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

#: levels a ciphertext has after desilofhe's bootstrap (Engine(bootstrap=True)): 17 = its max level, measured by
#: backends.he.fhe_primitives (`level_after_bootstrap`); None until measured: then the data
#: owner encrypts at the max level and no pass is planned ahead
BOOTSTRAP_LEVEL: int | None = 17
from backends.he.fhe_program import Program


def engine_version() -> str:
    from importlib.metadata import version

    return version("desilofhe")


class DataOwner:
    """Holds the secret key; everything it hands out is public or evaluation key material."""

    def __init__(self, threads: int) -> None:
        import desilofhe

        self.engine = desilofhe.Engine(mode="cpu", bootstrap=True, thread_count=threads)
        e = self.engine
        self.secret_key = e.create_secret_key()           # desilofhe samples it from its CSPRNG
        self.public_key = e.create_public_key(self.secret_key)

    def write_evaluation_keys(self, folder: Path) -> dict[str, int]:
        """Create the evaluation keys, write them for the model owner, drop our copies.
        Returns bytes per key file (what crosses to the model owner at setup)."""
        e, sk = self.engine, self.secret_key
        folder.mkdir(parents=True, exist_ok=True)
        sizes = {}
        for name, make, write in (
            ("public", lambda: self.public_key, e.write_public_key),
            ("relinearization", lambda: e.create_relinearization_key(sk), e.write_relinearization_key),
            ("conjugation", lambda: e.create_conjugation_key(sk), e.write_conjugation_key),
            ("rotation", lambda: e.create_roll_key(sk), e.write_roll_key),
            ("bootstrap", lambda: e.create_small_bootstrap_key(sk), e.write_small_bootstrap_key),
        ):
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
    """desilofhe behind the evaluator's `CKKS` interface, with evaluation keys only."""

    def __init__(self, engine, relinearization_key, conjugation_key, roll_key, small_bootstrap_key) -> None:
        self.e, self.rk, self.ck, self.roll, self.sbk = (engine, relinearization_key, conjugation_key,
                                                         roll_key, small_bootstrap_key)
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

    def poly(self, ct, coeffs):
        # products with plaintexts leave ciphertexts in NTT form, which these calls refuse
        return self.e.evaluate_polynomial(self.e.intt(ct), coeffs, self.rk)

    def bootstrap(self, ct):
        return self.e.bootstrap(self.e.intt(ct), self.rk, self.ck, self.roll, self.sbk)


class ModelOwner:
    """Evaluates the program on ciphertexts with evaluation keys only (`backends.he.fhe_eval`)."""

    def __init__(self, program: Program, key_folder: Path, threads: int, progress=None) -> None:
        import desilofhe

        self.engine = e = desilofhe.Engine(mode="cpu", bootstrap=True, thread_count=threads)
        ckks = DesiloCKKS(e, e.read_relinearization_key(str(key_folder / "relinearization.key")),
                          e.read_conjugation_key(str(key_folder / "conjugation.key")),
                          e.read_roll_key(str(key_folder / "rotation.key")),
                          e.read_small_bootstrap_key(str(key_folder / "bootstrap.key")))
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
    workdir = Path(settings["workdir"])
    program = Program.from_bytes(Path(settings["program"]).read_bytes())
    t0 = time.perf_counter()
    owner = DataOwner(threads)
    t1 = time.perf_counter()
    key_sizes = owner.write_evaluation_keys(workdir / "keys")
    t2 = time.perf_counter()
    server = ModelOwner(program, workdir / "keys", threads, stderr_progress)
    t3 = time.perf_counter()
    plan = {"input_level": None}
    if BOOTSTRAP_LEVEL is not None:
        plan = predict_counts(program, owner.engine.max_level, BOOTSTRAP_LEVEL)
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
