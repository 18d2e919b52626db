"""Run by tests/test_he_fhe.py with .venv-fhe's python. Writes OUT/result.json.

  fhe_party_check.py OUT          the real FHE parties (bootstrappable preset) on a small
                                  program (two linear ops with many diagonals, three
                                  polynomial ReLUs, a max): at least one bootstrap, many
                                  rotations; minutes of key generation (opt-in test)
  fhe_party_check.py OUT --small  the model owner's evaluator (`backends.he.fhe_eval`) on
                                  real desilofhe ciphertexts of a small non-bootstrapping
                                  engine: baby-step giant-step linear ops, one polynomial
                                  ReLU, a max; and the level model's predicted counts for
                                  the same program (default test: about a minute)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from backends.he.fhe_party import DataOwner, ModelOwner
from backends.he.fhe_program import Program


def small_program(slots: int, n: int = 64, seed: int = 0) -> Program:
    rng = np.random.default_rng(seed)
    r = np.repeat(np.arange(n), 5)
    c = (r + rng.integers(-40, 40, len(r))) % n
    ops = [
        {"op": "linear", "dst": "a", "src": "x", "rows": r, "cols": c, "vals": rng.normal(0, 0.1, len(r)),
         "bias": rng.normal(0, 0.1, n), "acc": False},
        {"op": "relu", "dst": "b", "src": "a", "k": 0.8},
        {"op": "relu", "dst": "b2", "src": "b", "k": 1.0},
        {"op": "sub", "dst": "d", "a": "b2", "b": "a"},
        {"op": "relu", "dst": "e", "src": "d", "k": 1.0},
        {"op": "add", "dst": "m", "a": "a", "b": "e"},
        {"op": "linear", "dst": "logits", "src": "m", "rows": np.repeat(np.arange(3), n),
         "cols": np.tile(np.arange(n), 3), "vals": rng.normal(0, 0.2, 3 * n),
         "bias": np.array([0.1, 0.2, 0.3]), "acc": False},
    ]
    return Program(slots=slots, ops=ops, input_size=n, n_labels=3)


def holds_secret_key(owner: DataOwner, path: Path, probe: bytes, expected: np.ndarray) -> bool:
    """Whether `path` decrypts a ciphertext of `expected`: then it is the secret key."""
    e = owner.engine
    try:
        sk = e.read_secret_key(str(path))
        got = np.asarray(e.decrypt(e.deserialize_ciphertext(probe), sk))[: len(expected)]
    except Exception:
        return False
    return bool(np.abs(got - expected).max() < 1e-3)


def main(out: Path) -> None:
    import time

    t0 = time.perf_counter()
    owner = DataOwner(threads=2)
    keys = out / "keys"
    owner.write_evaluation_keys(keys)
    print(f"keys in {time.perf_counter() - t0:.0f} s", flush=True)
    prog = small_program(owner.engine.slot_count)
    server = ModelOwner(prog, keys, threads=2)
    x = np.random.default_rng(1).uniform(-1, 1, prog.input_size)
    request = owner.encrypt(x)
    t0 = time.perf_counter()
    logits = owner.decrypt(server.handle(request), prog.n_labels)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    probe_x = np.linspace(-0.5, 0.5, 16)
    probe = owner.encrypt(probe_x)
    leaked = [p.name for p in sorted(keys.iterdir()) if holds_secret_key(owner, p, probe, probe_x)]
    control = out / "secret.key"                     # positive control: a real secret key file
    owner.engine.write_secret_key(owner.secret_key, str(control))
    result = {"max_abs_diff": float(np.abs(logits - prog.run_plain(x)).max()),
              "logits": logits.tolist(), "control": prog.run_plain(x).tolist(),
              "bootstraps": server.stats["bootstraps"], "rotations": server.stats["rotations"],
              "secret_key_files_for_model_owner": leaked,
              "control_secret_key_detected": holds_secret_key(owner, control, probe, probe_x),
              "stats": {k: v for k, v in server.stats.items() if k != "op_s"},
              "bytes": {"up": len(request), "keys": {p.name: p.stat().st_size for p in keys.iterdir()}}}
    control.unlink()
    for p in keys.iterdir():                          # gigabytes: do not leave them behind
        p.unlink()
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


def tiny_program(slots: int, n: int = 16, seed: int = 0) -> Program:
    """Few diagonals (baby and giant steps both used), one ReLU and a max: 7 levels."""
    rng = np.random.default_rng(seed)
    r = np.repeat(np.arange(n), 3)
    c = (r + rng.choice([0, 1, 3, 9, 12], len(r))) % n
    ops = [
        {"op": "linear", "dst": "a", "src": "x", "rows": r, "cols": c, "vals": rng.normal(0, 0.2, len(r)),
         "bias": rng.normal(0, 0.1, n), "acc": False},
        {"op": "relu", "dst": "b", "src": "a", "k": 0.8},
        {"op": "sub", "dst": "d", "a": "b", "b": "a"},
        {"op": "add", "dst": "m", "a": "a", "b": "d"},
        {"op": "linear", "dst": "logits", "src": "m", "rows": np.repeat(np.arange(2), n),
         "cols": np.tile(np.arange(n), 2), "vals": rng.normal(0, 0.3, 2 * n),
         "bias": np.array([0.1, -0.2]), "acc": False},
    ]
    return Program(slots=slots, ops=ops, input_size=n, n_labels=2, relu_stages=("f3",))


def main_small(out: Path) -> None:
    import desilofhe

    from backends.he.fhe_eval import Evaluator, predict_counts
    from backends.he.fhe_party import DesiloCKKS

    e = desilofhe.Engine(max_level=8, mode="cpu", thread_count=2)
    sk = e.create_secret_key()
    pk = e.create_public_key(sk)
    ckks = DesiloCKKS(e, e.create_relinearization_key(sk), None, e.create_roll_key(sk))
    prog = tiny_program(e.slot_count)
    ev = Evaluator(prog, ckks)
    x = np.random.default_rng(1).uniform(-1, 1, prog.input_size)
    v = np.zeros(e.slot_count)
    v[: len(x)] = x
    logits = np.asarray(e.decrypt(ev.run(e.encrypt(v, pk)), sk))[: prog.n_labels]
    stats = {k: v for k, v in ev.stats.items() if not k.endswith("_s") and k != "op_s"}
    predicted = predict_counts(prog, e.max_level, 0, input_level=e.max_level)
    result = {"max_abs_diff": float(np.abs(logits - prog.run_plain(x)).max()), "logits": logits.tolist(),
              "control": prog.run_plain(x).tolist(), "stats": stats,
              "predicted": {k: predicted[k] for k in stats}}
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    (main_small if "--small" in sys.argv[2:] else main)(Path(sys.argv[1]))
