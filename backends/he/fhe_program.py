"""The whole-network FHE program: a DenseNet as slot-vector ops, torch-free.

`backends.he.fhe_compile` (model owner, torch) turns the suite's DenseNet into a `Program`;
this module holds what both sides of the engine need without torch: the op list, the
polynomial ReLU, the float64 evaluator that is the row's plaintext control, and the
(de)serialisation that hands the program to the FHE party in `.venv-fhe/`.

Every register is one CKKS slot vector (channel-major c*H*W + y*W + x, zeros beyond its
length) holding value / scale, with every scale chosen by the model owner on public
calibration images so each register stays inside [-1, 1] (what bootstrapping and the
ReLU polynomial require). Ops:

  linear  dst = M @ src + bias (+ dst when `acc`): convolutions (BatchNorm folded), the
          pre-activation BatchNorm (a diagonal M), pooling tap selection, the transition's
          average pool + 1x1 conv, global average pool + classifier. A convolution over a
          channel concatenation is the sum of convolutions over the parts, so a DenseNet
          layer adds its new channels into the block register (`acc`): no concatenation.
  relu    dst = k * p(src), p a polynomial approximation of ReLU on [-1, 1] (the one
          stated approximation), k = scale(src) / scale(dst) folded into its coefficients.
  add/sub dst = a +/- b (same scale).

max(a, b) = b + relu(a - b), so the stem's 3x3 max-pool is four polynomial ReLUs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: ReLU approximation: relu(x) = (x + |x|) / 2 with |x| = x * sign(x) and sign a
#: composition of odd minimax-style polynomials (Lee et al. 2021 style), exact at 0.
#: Stage polynomials in x (coefficients of x, x^3, x^5, x^7): Cheon et al.'s f_3 and g_3.
F3 = (35 / 16, -35 / 16, 21 / 16, -5 / 16)
G3 = (4589 / 1024, -16577 / 1024, 25614 / 1024, -12860 / 1024)
#: default composition: g3 g3 g3 f3 f3 (degree 7 each, 3 levels each; 16 levels with x * sign,
#: so one bootstrap per ReLU at desilofhe's 17 levels after a bootstrap): |relu error| <= 3e-4
#: on [-1, 1]. Shorter compositions save polynomial stages and bootstraps (the level model, 64 px:
#: 28 bootstraps per image for the default, 24 for g3 g3 g3 f3 or g3 g3 f3) but on the suite's
#: trained small DenseNet (64 px, 30 synthetic test images, plaintext control vs the model)
#: max |dp| grows from 0.0037 to 0.023 (g3 g3 g3 f3), 0.057 (g3 g3 f3 f3), 0.245 (g3 g3 f3):
#: errors compound over 25 ReLUs. Selectable per row: he:engine=desilo,fhe_relu_stages=...
SIGN_STAGES = ("g3", "g3", "g3", "f3", "f3")
STAGES = {"f3": F3, "g3": G3}


def odd_poly(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    x2 = x * x
    out = np.zeros_like(x)
    power = x.copy()
    for c in coeffs:
        out = out + c * power
        power = power * x2
    return out


def sign_approx(x: np.ndarray, stages: tuple[str, ...] = SIGN_STAGES) -> np.ndarray:
    for s in stages:
        x = odd_poly(STAGES[s], x)
    return x


def relu_approx(x: np.ndarray, stages: tuple[str, ...] = SIGN_STAGES) -> np.ndarray:
    """The polynomial ReLU the encrypted program computes, in float64 (|x| <= 1 expected)."""
    return 0.5 * x * (1.0 + sign_approx(x, stages))


@dataclass
class Program:
    """A compiled HE-friendly network over slot vectors of length `slots`."""

    slots: int
    ops: list[dict[str, Any]]
    input_size: int                      # slots the data owner fills (its packed image)
    n_labels: int
    relu_stages: tuple[str, ...] = SIGN_STAGES
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ plaintext control

    def run_plain(self, x: np.ndarray, exact: bool = False) -> np.ndarray:
        """Logits [L] for one packed input vector, in float64. exact=False: the polynomial
        ReLU (the control row: the HE-friendly network in plaintext); exact=True: true ReLU
        (equals the suite's model up to float rounding: checks the rewrites)."""
        regs: dict[str, np.ndarray] = {"x": np.zeros(self.slots)}
        regs["x"][: len(x)] = x
        for op in self.ops:
            kind = op["op"]
            if kind == "linear":
                src = regs[op["src"]]
                # bincount sums repeated rows like np.add.at does, faster
                y = np.bincount(op["rows"], op["vals"] * src[op["cols"]], minlength=self.slots)
                y[: len(op["bias"])] += op["bias"]
                if op.get("acc"):
                    y += regs[op["dst"]]
                regs[op["dst"]] = y
            elif kind == "relu":
                src = regs[op["src"]]
                r = np.maximum(src, 0.0) if exact else relu_approx(src, self.relu_stages)
                regs[op["dst"]] = op["k"] * r
            elif kind == "add":
                regs[op["dst"]] = regs[op["a"]] + regs[op["b"]]
            elif kind == "sub":
                regs[op["dst"]] = regs[op["a"]] - regs[op["b"]]
            else:
                raise ValueError(f"unknown op {kind!r}")
        return regs["logits"][: self.n_labels].copy()

    # ------------------------------------------------------------------ coverage

    def macs(self) -> int:
        """Multiply-accumulates of the program's linear ops (nonzeros of every matrix) plus
        one per ReLU input slot used, the quantity `protected_mac_fraction` is measured in."""
        return int(sum(len(op["vals"]) for op in self.ops if op["op"] == "linear"))

    def relu_count(self) -> int:
        return sum(1 for op in self.ops if op["op"] == "relu")

    # ------------------------------------------------------------------ transport

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        header = {"slots": self.slots, "input_size": self.input_size, "n_labels": self.n_labels,
                  "relu_stages": list(self.relu_stages), "meta": self.meta, "ops": []}
        for i, op in enumerate(self.ops):
            plain = {}
            for k, v in op.items():
                if isinstance(v, np.ndarray):
                    arrays[f"{i}.{k}"] = v
                    plain[k] = {"array": f"{i}.{k}"}
                else:
                    plain[k] = v
            header["ops"].append(plain)
        import json

        buf = io.BytesIO()
        np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Program":
        import json

        z = np.load(io.BytesIO(data), allow_pickle=False)
        header = json.loads(bytes(z["__header__"]).decode())
        ops = []
        for plain in header["ops"]:
            ops.append({k: z[v["array"]] if isinstance(v, dict) and "array" in v else v
                        for k, v in plain.items()})
        return cls(slots=header["slots"], ops=ops, input_size=header["input_size"],
                   n_labels=header["n_labels"], relu_stages=tuple(header["relu_stages"]),
                   meta=header["meta"])


def relu_depth(stages: tuple[str, ...] = SIGN_STAGES) -> int:
    """Levels the polynomial ReLU consumes: 3 per degree-7 stage (`fhe_eval.STAGE_LEVELS`), +1 for x * sign."""
    return 3 * len(stages) + 1


def log2_ceil(n: int) -> int:
    return max(0, math.ceil(math.log2(max(1, n))))


# --------------------------------------------------------------------------- diagonals

def diagonal_offsets(op: dict[str, Any], slots: int) -> np.ndarray:
    """Each nonzero's diagonal: d = (col - row) mod slots, so y = sum_d diag_d * rot(x, d)."""
    return (op["cols"] - op["rows"]) % slots


def choose_giant_step(offsets: np.ndarray, slots: int) -> tuple[int, int, int]:
    """Baby-step giant-step split d = g * G + b minimising rotations (#b - 1 + #g - 1)
    over power-of-two G (and G=1: one rotation per diagonal). Returns (G, babies, giants)."""
    d = np.unique(offsets)
    best = (1, 1, len(d))
    best_cost = len(d) + (0 if 0 in d else 1)
    G = 2
    while G <= slots:
        babies = len(np.unique(d % G))
        giants = len(np.unique(d // G))
        if babies + giants < best_cost:
            best, best_cost = (G, babies, giants), babies + giants
        G *= 2
    return best


def linear_cost(op: dict[str, Any], slots: int) -> dict[str, int]:
    off = diagonal_offsets(op, slots)
    G, babies, giants = choose_giant_step(off, slots)
    return {"diagonals": int(len(np.unique(off))), "giant_step": G, "rotations": babies + giants - 2
            + (0 if 0 in np.unique(off % G) else 1) + (0 if 0 in np.unique(off // G) else 1)}
