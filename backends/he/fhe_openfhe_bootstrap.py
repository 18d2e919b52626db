"""One CKKS bootstrap in OpenFHE 1.6.1 at N = 2^16, 128-bit (HEStd_128_classic), for comparison
with desilofhe's (`backends.he.fhe_bootstrap_keys`). A measurement tool, not an engine.

OpenFHE's wheels for Python 3.12 need GLIBCXX_3.4.32 (Ubuntu 24.04); this Debian 12 machine
has 3.4.30, so the comparison runs from the Ubuntu 22.04 build (Python 3.10), in its own venv:
    python3.10 -m venv /work/venvs/openfhe
    /work/venvs/openfhe/bin/pip install "openfhe==1.6.1.0.22.4" "numpy<2.3"
    OMP_NUM_THREADS=2 /work/venvs/openfhe/bin/python backends/he/fhe_openfhe_bootstrap.py [--json out.json]
Parameters follow OpenFHE's own bootstrapping example (FLEXIBLEAUTO, uniform ternary secret,
level budget [3, 3], full 2^15 slots) with 10 levels left after a bootstrap and 40-bit scaling
primes: the example's [4, 4] and 59-bit primes are too large a modulus for 128-bit at N = 2^16 (OpenFHE refuses
parameters that are not 128-bit secure by the HE standard table).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(levels_after: int = 10, budget: tuple[int, int] = (3, 3), scale_bits: int = 40, log=print) -> dict:
    import openfhe as fhe

    res: dict = {"library": "openfhe 1.6.1", "ring_dim": 1 << 16, "security": "HEStd_128_classic",
                 "level_budget": list(budget), "levels_after_bootstrap_requested": levels_after,
           "scale_bits": scale_bits}
    p = fhe.CCParamsCKKSRNS()
    p.SetSecretKeyDist(fhe.SecretKeyDist.UNIFORM_TERNARY)
    p.SetSecurityLevel(fhe.SecurityLevel.HEStd_128_classic)
    p.SetRingDim(1 << 16)
    p.SetScalingTechnique(fhe.ScalingTechnique.FLEXIBLEAUTO)
    p.SetScalingModSize(scale_bits)
    p.SetFirstModSize(60)
    depth = levels_after + fhe.CryptoContext.GetBootstrapDepth(list(budget), fhe.SecretKeyDist.UNIFORM_TERNARY)
    p.SetMultiplicativeDepth(depth)
    res["multiplicative_depth"] = depth
    cc = fhe.GenCryptoContext(p)
    for feature in (fhe.PKESchemeFeature.PKE, fhe.PKESchemeFeature.KEYSWITCH, fhe.PKESchemeFeature.LEVELEDSHE,
                    fhe.PKESchemeFeature.ADVANCEDSHE, fhe.PKESchemeFeature.FHE):
        cc.Enable(feature)
    slots = (1 << 16) // 2
    t = time.perf_counter()
    cc.EvalBootstrapSetup(list(budget), [0, 0], slots)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    cc.EvalBootstrapKeyGen(keys.secretKey, slots)
    res["keygen_s"] = time.perf_counter() - t
    res["keygen_peak_rss_bytes"] = _rss_bytes()
    log(f"openfhe keys in {res['keygen_s']:.0f} s, peak rss {res['keygen_peak_rss_bytes'] >> 20} MB")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, slots)
    pt = cc.MakeCKKSPackedPlaintext(x.tolist(), 1, depth - 1, None, slots)
    ct = cc.Encrypt(keys.publicKey, pt)
    res["level_in"] = depth - 1
    w, c = time.perf_counter(), time.process_time()
    out = cc.EvalBootstrap(ct)
    res["bootstrap_s"], res["bootstrap_cpu_s"] = time.perf_counter() - w, time.process_time() - c
    res["threads_used"] = res["bootstrap_cpu_s"] / res["bootstrap_s"]
    res["levels_after_bootstrap"] = depth - out.GetLevel()
    dec = cc.Decrypt(out, keys.secretKey)
    dec.SetLength(slots)
    res["max_abs_err"] = float(np.abs(np.array(dec.GetRealPackedValue()) - x).max())
    res["peak_rss_bytes"] = _rss_bytes()
    res["cpu_s_total"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    log(f"openfhe bootstrap {res['bootstrap_s']:.1f} s wall, {res['bootstrap_cpu_s']:.1f} s CPU, "
        f"max err {res['max_abs_err']:.2e}")
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels-after", type=int, default=10)
    ap.add_argument("--scale-bits", type=int, default=40)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    res = measure(a.levels_after, scale_bits=a.scale_bits, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
