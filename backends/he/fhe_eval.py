"""The model owner's evaluation of a `Program` over a CKKS back end, and a level-only back end
that predicts a pass's operation counts (and, with measured per-primitive seconds, its time).

Torch- and desilofhe-free: `backends.he.fhe_party` plugs desilofhe in (`DesiloCKKS`); the
level model (`LevelModel`) runs the very same evaluation code on level numbers only, so the
predicted counts (bootstraps, rotations, plaintext products, polynomial stages) are the
counts the encrypted pass performs, not a separate formula.

Linear ops run as baby-step giant-step diagonal products: y = sum_g rot(sum_b p_{g,b} *
rot(x, b), g*G), with p the diagonal pre-rotated by -g*G; the baby rotations of one input are
computed once (hoisted) and shared by every giant step. A ciphertext is bootstrapped only
when it has fewer levels than its next step needs (lazy level planning).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from backends.he.fhe_program import STAGES, Program, choose_giant_step, diagonal_offsets

#: levels one degree-7 odd polynomial stage consumes: 3, the least a degree-7 polynomial can
#: take (x^2, x^4 and the coefficient products in a depth-3 tree, `CKKS.odd_poly`); desilofhe's
#: own evaluate_polynomial takes 4, which made the 5-stage ReLU 21 levels (two bootstraps per
#: ReLU at 17 levels per bootstrap) instead of 16 (one)
STAGE_LEVELS = 3
#: primitive categories whose seconds the evaluator accumulates (stats[f"{kind}_s"])
KINDS = ("rotation", "plain_mult", "poly", "ct_mult", "bootstrap", "add")


class CKKS(Protocol):
    """What the evaluator needs from a CKKS library (ciphertexts are opaque)."""

    slots: int

    def level(self, ct) -> int: ...
    def rotate_many(self, ct, shifts: list[int]) -> list: ...       # slot i <- slot i + d
    def rotate(self, ct, shift: int): ...
    def mul_plain(self, ct, vector: np.ndarray): ...                 # consumes one level
    def mul_const(self, ct, c: float): ...
    def mul(self, a, b): ...                                          # relinearised, one level
    def add(self, a, b): ...
    def sub(self, a, b): ...
    def add_plain(self, ct, vector: np.ndarray): ...
    def level_down(self, ct, level: int): ...
    def odd_poly(self, ct, coeffs: list[float]): ...                  # c1 x + c3 x^3 + c5 x^5 + c7 x^7, STAGE_LEVELS
    def bootstrap(self, ct): ...


def linear_plan(op: dict[str, Any], slots: int, values: bool = True) -> dict[str, Any]:
    """Diagonals of one linear op grouped for baby-step giant-step, pre-rotated (float64).
    values=False: the grouping only (group -> baby shifts), what level planning needs."""
    off = diagonal_offsets(op, slots)
    G, _, _ = choose_giant_step(off, slots)
    groups: dict[int, dict[int, Any]] = {}
    order = np.argsort(off, kind="stable")
    off_s, rows_s, vals_s = off[order], op["rows"][order], op["vals"][order]
    bounds = np.flatnonzero(np.diff(off_s)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(off_s)]):
        d = int(off_s[lo])
        g, b = divmod(d, G)
        diag = None
        if values:
            diag = np.zeros(slots)
            np.add.at(diag, rows_s[lo:hi], vals_s[lo:hi])
            diag = np.roll(diag, g * G)
        groups.setdefault(g * G, {})[b] = diag
    bias = None
    if len(op["bias"]):
        bias = np.zeros(slots)
        bias[: len(op["bias"])] = op["bias"]
    return {"groups": groups, "babies": sorted({b for grp in groups.values() for b in grp}), "bias": bias}


class Evaluator:
    """Runs `program` on one ciphertext with evaluation keys only (inside `ckks`)."""

    def __init__(self, program: Program, ckks: CKKS, progress=None) -> None:
        if program.slots != ckks.slots:
            raise ValueError(f"program compiled for {program.slots} slots, engine has {ckks.slots}")
        self.program, self.ckks, self.progress = program, ckks, progress
        # diagonals are built when their op runs (all of them at once: ~1.4 GB at 64 px);
        # a level-only back end needs the grouping alone, which is cached
        self.values = not isinstance(ckks, LevelModel)
        self.plans: list[dict[str, Any] | None] = [None] * len(program.ops)
        self.stats: dict[str, Any] = {}

    def _plan(self, i: int) -> dict[str, Any]:
        if self.plans[i] is not None:
            return self.plans[i]
        plan = linear_plan(self.program.ops[i], self.ckks.slots, self.values)
        if not self.values:
            self.plans[i] = plan
        return plan

    def _count(self, kind: str, n: int, start: float) -> None:
        self.stats[kind + "s"] = self.stats.get(kind + "s", 0) + n
        self.stats[kind + "_s"] = self.stats.get(kind + "_s", 0.0) + time.perf_counter() - start

    def run(self, ct):
        self.stats = {f"{k}s": 0 for k in KINDS} | {f"{k}_s": 0.0 for k in KINDS} | {"op_s": {}, "relus": 0}
        regs = {"x": ct}
        n_ops = len(self.program.ops)
        for i, op in enumerate(self.program.ops):
            start = time.perf_counter()
            kind = op["op"]
            if kind == "linear":
                y = self._linear(self._ready(regs[op["src"]], 1), self._plan(i))
                if op.get("acc"):
                    y = self._add(y, regs[op["dst"]])
                regs[op["dst"]] = y
            elif kind == "relu":
                regs[op["dst"]] = self._relu(regs[op["src"]], float(op["k"]))
                self.stats["relus"] += 1
            elif kind == "add":
                regs[op["dst"]] = self._add(regs[op["a"]], regs[op["b"]])
            elif kind == "sub":
                a, b = self._align(regs[op["a"]], regs[op["b"]])
                t = time.perf_counter()
                regs[op["dst"]] = self.ckks.sub(a, b)
                self._count("add", 1, t)
            else:
                raise ValueError(f"unknown op {kind!r}")
            took = time.perf_counter() - start
            key = f"{kind}:{op['dst']}"
            self.stats["op_s"][key] = self.stats["op_s"].get(key, 0.0) + took
            if self.progress:
                self.progress(i + 1, n_ops, key, took, self.stats)
        return regs["logits"]

    # ------------------------------------------------------------------ levels

    def _ready(self, ct, levels: int):
        """ct with at least `levels` levels left: bootstrapped when it has fewer."""
        if self.ckks.level(ct) >= levels:
            return ct
        t = time.perf_counter()
        out = self.ckks.bootstrap(ct)
        self._count("bootstrap", 1, t)
        if self.ckks.level(out) < levels:
            raise RuntimeError(f"a bootstrap leaves {self.ckks.level(out)} levels, {levels} needed")
        return out

    def _align(self, a, b):
        la, lb = self.ckks.level(a), self.ckks.level(b)
        if la > lb:
            a = self.ckks.level_down(a, lb)
        elif lb > la:
            b = self.ckks.level_down(b, la)
        return a, b

    def _add(self, a, b):
        a, b = self._align(a, b)
        t = time.perf_counter()
        out = self.ckks.add(a, b)
        self._count("add", 1, t)
        return out

    # ------------------------------------------------------------------ ops

    def _linear(self, x, plan):
        c = self.ckks
        shifts = [b for b in plan["babies"] if b]
        t = time.perf_counter()
        rolled = dict(zip(shifts, c.rotate_many(x, shifts))) if shifts else {}
        self._count("rotation", len(shifts), t)
        rolled[0] = x
        out = None
        for gG, group in plan["groups"].items():
            acc = None
            for b, p in group.items():
                t = time.perf_counter()
                term = c.mul_plain(rolled[b], p)
                self._count("plain_mult", 1, t)
                acc = term if acc is None else self._add(acc, term)
            if gG:
                t = time.perf_counter()
                acc = c.rotate(acc, gG)
                self._count("rotation", 1, t)
            out = acc if out is None else self._add(out, acc)
        if plan["bias"] is not None:
            t = time.perf_counter()
            out = c.add_plain(out, plan["bias"])
            self._count("add", 1, t)
        return out

    def _relu(self, x, k: float):
        """k * relu(x) = (k/2) * (x + x * sign(x)), sign a composition of odd stages."""
        c = self.ckks
        stages = list(self.program.relu_stages)
        x = self._ready(x, STAGE_LEVELS)       # x is used again at the end (x * s, k/2 * x)
        s = x
        for i, name in enumerate(stages):
            coeffs = list(STAGES[name])
            last = i == len(stages) - 1
            if last:
                coeffs = [v * k / 2 for v in coeffs]
            s = self._ready(s, STAGE_LEVELS + (1 if last else 0))
            t = time.perf_counter()
            s = c.odd_poly(s, coeffs)
            self._count("poly", 1, t)
        if c.level(x) < 1:
            x = self._ready(x, 1)
        xs, s = self._align(x, s)
        t = time.perf_counter()
        prod = c.mul(xs, s)
        self._count("ct_mult", 1, t)
        t = time.perf_counter()
        half = c.mul_const(x, k / 2)
        self._count("add", 1, t)
        return self._add(prod, half)


# --------------------------------------------------------------------------- prediction

class LevelModel:
    """A CKKS stand-in holding levels only: the evaluator's counts without encryption. It also
    sums (level + 1) per primitive (`limbs`): a product or rotation costs about one unit per
    RNS limb, which is how `predict_seconds` prices ops at the levels they run at."""

    def __init__(self, slots: int, max_level: int, boot_level: int) -> None:
        self.slots, self.max_level, self.boot_level = slots, max_level, boot_level
        self.limbs: dict[str, int] = {}

    def _at(self, kind: str, level: int, n: int = 1) -> None:
        self.limbs[kind] = self.limbs.get(kind, 0) + n * (level + 1)

    def level(self, ct):
        return ct

    def rotate_many(self, ct, shifts):
        self._at("rotations", ct, len(shifts))
        return [ct] * len(shifts)

    def rotate(self, ct, shift):
        self._at("rotations", ct)
        return ct

    def mul_plain(self, ct, vector):
        self._at("plain_mults", ct)
        return ct - 1

    def mul_const(self, ct, c):
        return ct - 1

    def mul(self, a, b):
        self._at("ct_mults", min(a, b))
        return min(a, b) - 1

    def add(self, a, b):
        return min(a, b)

    sub = add

    def add_plain(self, ct, vector):
        return ct

    def level_down(self, ct, level):
        return level

    def odd_poly(self, ct, coeffs):
        self._at("polys", ct)
        return ct - STAGE_LEVELS

    def bootstrap(self, ct):
        return self.boot_level


def predict_counts(program: Program, max_level: int, boot_level: int,
                   input_level: int | None = None) -> dict[str, Any]:
    """The encrypted pass's operation counts, from the evaluator run on levels only, and the
    lowest input level that needs no more bootstraps than a fresh (max-level) ciphertext:
    the data owner encrypts at that level (smaller upload, cheaper first layers)."""
    model = LevelModel(program.slots, max_level, boot_level)
    ev = Evaluator(program, model)

    def counts(level: int) -> dict[str, Any]:
        model.limbs = {}
        ev.run(level)
        out = {k: v for k, v in ev.stats.items() if not k.endswith("_s") and k != "op_s"}
        out["limbs"] = dict(model.limbs)
        return out

    if input_level is None:
        floor = counts(max_level)["bootstraps"]
        input_level = next(lv for lv in range(1, max_level + 1) if counts(lv)["bootstraps"] <= floor)
    out = counts(input_level)
    out["input_level"] = input_level
    return out


#: which measured primitive prices each counted category (fhe_primitives' keys), and the
#: level it was measured at (fresh ciphertexts: the engine's max level)
PRICE = {"rotations": "roll_general_s", "plain_mults": "plain_mult_array_s", "polys": "poly7_s",
         "ct_mults": "ct_mult_relin_s", "bootstraps": "bootstrap_s", "adds": "add_s"}


def predict_seconds(counts: dict[str, Any], primitives: dict[str, Any]) -> dict[str, float]:
    """Estimated seconds per category and in total: each op's measured seconds at the max
    level, scaled by (its level + 1) / (max level + 1); bootstraps and additions unscaled.
    An estimate (linear-in-limbs is an approximation), never a measurement."""
    ref = primitives["max_level"] + 1
    out = {}
    for kind, key in PRICE.items():
        if key not in primitives:
            continue
        limbs = counts.get("limbs", {}).get(kind)
        out[kind] = primitives[key] * (limbs / ref if limbs is not None else counts[kind])
    out["total"] = sum(out.values())
    return out
