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

from backends.he.fhe_program import STAGES, Program, choose_giant_step, diagonal_offsets

#: levels desilofhe's evaluate_polynomial consumes for one degree-7 stage (measured: 4)
STAGE_LEVELS = 4


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

    def encrypt(self, vector: np.ndarray) -> bytes:
        v = np.zeros(self.engine.slot_count)
        v[: len(vector)] = vector
        return bytes(self.engine.serialize_ciphertext(self.engine.encrypt(v, self.public_key)))

    def decrypt(self, blob: bytes, n: int) -> np.ndarray:
        ct = self.engine.deserialize_ciphertext(blob)
        return np.asarray(self.engine.decrypt(ct, self.secret_key))[:n].copy()


class ModelOwner:
    """Evaluates the program on ciphertexts with evaluation keys only."""

    def __init__(self, program: Program, key_folder: Path, threads: int) -> None:
        import desilofhe

        self.engine = desilofhe.Engine(mode="cpu", bootstrap=True, thread_count=threads)
        e = self.engine
        if program.slots != e.slot_count:
            raise ValueError(f"program compiled for {program.slots} slots, engine has {e.slot_count}")
        self.program = program
        self.rk = e.read_relinearization_key(str(key_folder / "relinearization.key"))
        self.ck = e.read_conjugation_key(str(key_folder / "conjugation.key"))
        self.roll = e.read_roll_key(str(key_folder / "rotation.key"))
        self.sbk = e.read_small_bootstrap_key(str(key_folder / "bootstrap.key"))
        self.slots = e.slot_count
        self.plans = [self._plan(op) if op["op"] == "linear" else None for op in program.ops]
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ compilation

    def _plan(self, op: dict[str, Any]) -> dict[str, Any]:
        """Diagonals of one linear op grouped for baby-step giant-step, pre-rotated."""
        S = self.slots
        off = diagonal_offsets(op, S)
        G, _, _ = choose_giant_step(off, S)
        groups: dict[int, dict[int, np.ndarray]] = {}
        order = np.argsort(off, kind="stable")
        off_s, rows_s, vals_s = off[order], op["rows"][order], op["vals"][order]
        bounds = np.flatnonzero(np.diff(off_s)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(off_s)]):
            d = int(off_s[lo])
            diag = np.zeros(S)
            np.add.at(diag, rows_s[lo:hi], vals_s[lo:hi])
            g, b = divmod(d, G)
            # rot(p * rot(x, b), g*G) = diag_d * rot(x, d) with p = rot(diag_d, -g*G)
            groups.setdefault(g * G, {})[b] = np.roll(diag, g * G)
        bias = np.zeros(S)
        bias[: len(op["bias"])] = op["bias"]
        return {"groups": groups, "babies": sorted({b for grp in groups.values() for b in grp}),
                "bias": bias if len(op["bias"]) else None}

    # ------------------------------------------------------------------ evaluation

    def handle(self, request: bytes) -> bytes:
        e = self.engine
        self.stats = {"bootstraps": 0, "rotations": 0, "plain_mults": 0, "ct_mults": 0, "relus": 0,
                      "op_s": {}, "bootstrap_s": 0.0, "rotation_s": 0.0, "plain_mult_s": 0.0,
                      "relu_s": 0.0}
        regs = {"x": e.deserialize_ciphertext(request)}
        for op, plan in zip(self.program.ops, self.plans):
            start = time.perf_counter()
            kind = op["op"]
            if kind == "linear":
                y = self._linear(self._ready(regs[op["src"]], 1), plan)
                if op.get("acc"):
                    y = self._add(y, regs[op["dst"]])
                regs[op["dst"]] = y
            elif kind == "relu":
                boot = self.stats["bootstrap_s"]
                regs[op["dst"]] = self._relu(regs[op["src"]], float(op["k"]))
                self.stats["relus"] += 1
                self.stats["relu_s"] += time.perf_counter() - start - (self.stats["bootstrap_s"] - boot)
            elif kind == "add":
                regs[op["dst"]] = self._add(regs[op["a"]], regs[op["b"]])
            elif kind == "sub":
                a, b = self._align(regs[op["a"]], regs[op["b"]])
                regs[op["dst"]] = e.subtract(a, b)
            key = f"{kind}:{op['dst']}"
            self.stats["op_s"][key] = self.stats["op_s"].get(key, 0.0) + time.perf_counter() - start
        return bytes(e.serialize_ciphertext(regs["logits"]))

    def _ready(self, ct, levels: int):
        """ct with at least `levels` levels left: bootstrapped when it has fewer."""
        if ct.level >= levels:
            return ct
        start = time.perf_counter()
        # products with plaintexts leave ciphertexts in NTT form, which these calls refuse
        out = self.engine.bootstrap(self.engine.intt(ct), self.rk, self.ck, self.roll, self.sbk)
        self.stats["bootstraps"] += 1
        self.stats["bootstrap_s"] += time.perf_counter() - start
        if out.level < levels:
            raise RuntimeError(f"a bootstrap leaves {out.level} levels, {levels} needed")
        return out

    def _align(self, a, b):
        e = self.engine
        if a.level > b.level:
            a = e.level_down(a, b.level)
        elif b.level > a.level:
            b = e.level_down(b, a.level)
        return a, b

    def _add(self, a, b):
        a, b = self._align(a, b)
        return self.engine.add(a, b)

    def _rotate(self, ct, d: int):
        """Slot i of the result = slot (i + d) mod S of ct."""
        d %= self.slots
        if d == 0:
            return ct
        self.stats["rotations"] += 1
        start = time.perf_counter()
        out = self.engine.roll(ct, self.roll, (-d) % self.slots)
        self.stats["rotation_s"] += time.perf_counter() - start
        return out

    def _linear(self, x, plan):
        e = self.engine
        baby = {b: self._rotate(x, b) for b in plan["babies"]}
        out = None
        for gG, group in plan["groups"].items():
            acc = None
            for b, p in group.items():
                start = time.perf_counter()
                term = e.multiply(baby[b], p)
                self.stats["plain_mult_s"] += time.perf_counter() - start
                self.stats["plain_mults"] += 1
                acc = term if acc is None else e.add(acc, term)
            acc = self._rotate(acc, gG)
            out = acc if out is None else self._add(out, acc)
        if plan["bias"] is not None:
            out = e.add(out, plan["bias"])
        return out

    def _relu(self, x, k: float):
        """k * relu(x) = (k/2) * (x + x * sign(x)), sign a composition of odd stages."""
        e = self.engine
        stages = list(self.program.relu_stages)
        x = self._ready(x, STAGE_LEVELS)      # x itself is used again at the end (x * s, k/2 * x)
        s = x
        for i, name in enumerate(stages):
            coeffs = list(STAGES[name])
            if i == len(stages) - 1:
                coeffs = [c * k / 2 for c in coeffs]
            power = [0.0] * (2 * len(coeffs))
            power[1::2] = coeffs
            s = self._ready(s, STAGE_LEVELS + (1 if i == len(stages) - 1 else 0))
            s = e.evaluate_polynomial(e.intt(s), power, self.rk)
            self.stats["ct_mults"] += 4
        xs, s = self._align(x, s)
        prod = e.multiply(xs, s, self.rk)
        self.stats["ct_mults"] += 1
        half = e.multiply(x, k / 2)
        return self._add(prod, half)


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
    server = ModelOwner(program, workdir / "keys", threads)
    t3 = time.perf_counter()
    send(conn, {"ok": True, "keys": key_sizes, "engine_s": t1 - t0, "keygen_s": t2 - t1,
                "load_s": t3 - t2, "slots": owner.engine.slot_count, "max_level": owner.engine.max_level,
                "version": engine_version(), "peak_rss": _peak_rss()})
    while True:
        msg = recv(conn)
        if msg[0] == "stop":
            send(conn, {"ok": True})
            return
        if msg[0] == "infer":
            out = []
            for vec in msg[1]:
                a = time.perf_counter()
                request = owner.encrypt(np.asarray(vec, np.float64))
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
