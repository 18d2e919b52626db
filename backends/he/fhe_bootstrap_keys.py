"""One CKKS bootstrap with each of desilofhe's key options, measured: seconds (wall and CPU),
key bytes, peak memory, max error, output level, and whether `thread_count` is honoured.

Run from `.venv-fhe/` (desilofhe, no torch):
    .venv-fhe/bin/python -m backends.he.fhe_bootstrap_keys [--options full-medium,...]
        [--cap-gb 12] [--threads 2] [--mode cpu] [--json out.json]
Each option runs in a child process of its own (`--one OPTION`): the driver polls the child's
resident memory and kills it above `--cap-gb` (the machine is shared: a 15 GB key must not
push other people's jobs out of memory), and reads its CPU seconds from wait4's rusage.

Options (what the model owner holds to bootstrap):
  small+roll     small bootstrap key + the general roll key (the engine's choice until now)
  full-SIZE      the full bootstrap key (every fixed rotation key the bootstrap needs,
                 pre-encoded stages), SIZE medium | large (desilofhe 2.0.0 refuses "small")
  evaluation-SIZE  desilofhe's EvaluationKey (all evaluation keys in one), SIZE as above
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OPTIONS = ("full-medium", "evaluation-medium", "full-large", "small+roll")


def _vm_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _key_bytes(key) -> int:
    """Bytes of the key as serialised (what the data owner sends the model owner)."""
    return int(key.serialized_nbytes)


def measure_one(option: str, threads: int, mode: str, log=print) -> dict:
    """Keys for `option`, one bootstrap of a level-3 ciphertext, its error and level."""
    import desilofhe

    res: dict = {"option": option, "threads": threads, "mode": mode}
    e = desilofhe.Engine(mode=mode, bootstrap=True, thread_count=threads)
    sk = e.create_secret_key()
    pk = e.create_public_key(sk)
    rk, ck = e.create_relinearization_key(sk), e.create_conjugation_key(sk)
    t = time.perf_counter()
    kind, _, size = option.partition("-")
    if option == "small+roll":
        roll, sbk = e.create_roll_key(sk), e.create_small_bootstrap_key(sk)
        res["key_bytes"] = {"roll": _key_bytes(roll),
                            "small_bootstrap": _key_bytes(sbk)}
        boot = lambda ct: e.bootstrap(ct, rk, ck, roll, sbk)  # noqa: E731
        rotation_key = roll
    elif kind == "full":
        bk = e.create_bootstrap_key(sk, size=size)
        res["key_bytes"] = {"bootstrap": _key_bytes(bk)}
        boot = lambda ct: e.bootstrap(ct, rk, ck, bk)  # noqa: E731
        rotation_key = bk
    elif kind == "evaluation":
        ek = e.create_evaluation_key(sk, size=size)
        res["key_bytes"] = {"evaluation": _key_bytes(ek)}
        boot = lambda ct: e.bootstrap(ct, ek)  # noqa: E731
        rotation_key = ek
    else:
        raise SystemExit(f"unknown option {option!r}: use one of {OPTIONS}")
    res["keygen_s"] = time.perf_counter() - t
    res["key_bytes"]["relinearization+conjugation"] = _key_bytes(rk) + _key_bytes(ck)
    log(f"{option}: keys {res['key_bytes']} in {res['keygen_s']:.0f} s, rss {_vm_kb('self', 'VmRSS') >> 10} MB")
    v = np.random.default_rng(0).uniform(-0.5, 0.5, e.slot_count)
    low = e.level_down(e.encrypt(v, pk), 3)
    w, c = time.perf_counter(), time.process_time()
    out = boot(low)
    res["bootstrap_s"], res["bootstrap_cpu_s"] = time.perf_counter() - w, time.process_time() - c
    res["threads_used"] = res["bootstrap_cpu_s"] / res["bootstrap_s"]
    res["level_in"], res["level_after_bootstrap"] = 3, out.level
    res["max_abs_err"] = float(np.abs(np.asarray(e.decrypt(out, sk)) - v).max())
    for shift, level in ((37, out.level), (37, 3), (64, out.level)):
        try:                              # a general rotation with the same key, if it allows one
            ct = e.level_down(out, level) if level < out.level else out
            w = time.perf_counter()
            rolled = e.roll(ct, rotation_key, shift)
            res[f"roll{shift}_level{level}_s"] = time.perf_counter() - w
            ok = np.abs(np.asarray(e.decrypt(rolled, sk)) - np.roll(v, shift)).max() < 1e-3
            res[f"roll{shift}_level{level}_correct"] = bool(ok)
        except Exception as exc:          # noqa: BLE001 - recorded, not fatal
            res[f"roll{shift}_level{level}_error"] = f"{type(exc).__name__}: {exc}"
    res["peak_rss_bytes"] = _vm_kb("self", "VmHWM") * 1024
    log(f"{option}: bootstrap {res['bootstrap_s']:.1f} s wall, {res['bootstrap_cpu_s']:.1f} s CPU, "
        f"level {out.level}, max err {res['max_abs_err']:.2e}")
    return res


def run_capped(option: str, threads: int, mode: str, cap_gb: float, timeout_s: float) -> dict:
    """measure_one in a child process, killed above cap_gb resident or after timeout_s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        proc = subprocess.Popen([sys.executable, "-m", "backends.he.fhe_bootstrap_keys", "--one", option,
                                 "--threads", str(threads), "--mode", mode, "--json", str(out)])
        start, peak, why = time.perf_counter(), 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _vm_kb(proc.pid, "VmRSS")
            peak = max(peak, rss)
            if rss > cap_gb * 2 ** 20:
                why = f"killed: resident memory over the {cap_gb:g} GB cap"
            elif time.perf_counter() - start > timeout_s:
                why = f"killed: no result within {timeout_s:.0f} s"
            if why:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = status
        res = json.loads(out.read_text()) if out.exists() else {"option": option}
        res["process_cpu_s"] = usage.ru_utime + usage.ru_stime
        res["process_wall_s"] = time.perf_counter() - start
        res["polled_peak_rss_bytes"] = peak * 1024
        if why or status:
            res["error"] = why or f"exit status {status}"
        return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--one", help="measure one option in this process (the driver's child)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="cpu", help="desilofhe Engine mode: cpu | parallel")
    ap.add_argument("--cap-gb", type=float, default=12.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per option")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.one:
        res = measure_one(a.one, a.threads, a.mode, log)
    else:
        res = []
        for option in a.options.split(","):
            res.append(run_capped(option, a.threads, a.mode, a.cap_gb, a.timeout))
            log(json.dumps(res[-1]))
            if a.json:
                a.json.write_text(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
