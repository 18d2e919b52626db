"""A per-layer cost estimate of whole-network FHE for DenseNets too big to run here
(DenseNet-121 at 224 px), from measured per-operation costs. Projected, never measured.

The layout is the engine's: channel-major registers, ceil(C*H*W / slots) ciphertexts per
register, each linear op done block by block (input ciphertext x output ciphertext) with
baby-step giant-step diagonals; each ReLU a polynomial per ciphertext with one bootstrap.
Per stride-1 k x k convolution between blocks holding ci and co channels, the diagonals
are (ci + co - 1) * k^2 and the rotations about 2 * sqrt of that; the count is exact for
one-ciphertext registers (checked against the compiled small DenseNet by the benchmark)
and an estimate beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class OpCosts:
    """Seconds per operation at ring degree 2^16, measured by the engine on this machine."""
    rotation_s: float
    plain_mult_s: float
    relu_s: float            # one polynomial ReLU on one ciphertext, without its bootstraps
    bootstrap_s: float
    bootstraps_per_relu: float = 1.0


def densenet_layers(growth: int, blocks: tuple[int, ...], init: int, bn_size: int, resolution: int
                    ) -> list[dict]:
    """The DenseNet's encrypted work, layer by layer (torchvision/xrv DenseNet-BC)."""
    out = []
    H = resolution // 2
    out.append({"name": "conv0", "kind": "conv", "ci": 4, "co": init, "k": 4, "hw": H * H})
    out.append({"name": "pool0", "kind": "maxpool", "c": init, "hw": H * H})
    H //= 2
    C = init
    for b, n in enumerate(blocks):
        for i in range(n):
            tag = f"block{b + 1}.layer{i + 1}"
            out.append({"name": f"{tag}.relu1", "kind": "relu", "c": C, "hw": H * H})
            out.append({"name": f"{tag}.conv1", "kind": "conv", "ci": C, "co": bn_size * growth, "k": 1,
                        "hw": H * H})
            out.append({"name": f"{tag}.relu2", "kind": "relu", "c": bn_size * growth, "hw": H * H})
            out.append({"name": f"{tag}.conv2", "kind": "conv", "ci": bn_size * growth, "co": growth, "k": 3,
                        "hw": H * H})
            C += growth
        if b < len(blocks) - 1:
            out.append({"name": f"transition{b + 1}.relu", "kind": "relu", "c": C, "hw": H * H})
            out.append({"name": f"transition{b + 1}.conv", "kind": "conv", "ci": C, "co": C // 2, "k": 1,
                        "hw": H * H})
            out.append({"name": f"transition{b + 1}.pool", "kind": "avgpool", "c": C // 2, "hw": H * H})
            C //= 2
            H //= 2
    out.append({"name": "norm5.relu", "kind": "relu", "c": C, "hw": H * H})
    out.append({"name": "classifier", "kind": "fc", "ci": C, "co": 18, "hw": H * H})
    return out


def _cts(values: int, slots: int) -> int:
    return max(1, math.ceil(values / slots))


def layer_ops(layer: dict, slots: int) -> dict[str, float]:
    """Rotations, plaintext products, ReLU ciphertexts of one layer."""
    hw = layer["hw"]
    kind = layer["kind"]
    if kind in ("relu",):
        return {"rotations": 0, "plain_mults": _cts(layer["c"] * hw, slots), "relu_cts": _cts(layer["c"] * hw, slots)}
    if kind == "maxpool":          # 4 ReLUs (3x3 separable) + 6 tap selections + 2 compactions
        n = _cts(layer["c"] * hw, slots)
        side = int(math.isqrt(hw))
        return {"rotations": n * 8 * 2 * math.sqrt(side), "plain_mults": n * 8 * side, "relu_cts": 5 * n}
    if kind == "avgpool":
        n = _cts(layer["c"] * hw, slots)
        side = int(math.isqrt(hw))
        return {"rotations": n * 4 * 2 * math.sqrt(side), "plain_mults": n * (2 * side + layer["c"]),
                "relu_cts": 0}
    ci, co, k = layer["ci"], layer["co"], layer.get("k", 1)
    if kind == "fc":
        diag = ci * hw + co
        return {"rotations": 2 * math.sqrt(diag), "plain_mults": diag, "relu_cts": 0}
    per_ct = max(1, slots // hw)                    # channels per ciphertext
    bin_, bout = _cts(ci * hw, slots), _cts(co * hw, slots)
    cin, cout = min(ci, per_ct), min(co, per_ct)
    diag = (cin + cout - 1) * k * k
    pairs = bin_ * bout
    return {"rotations": bin_ * k * k * math.sqrt(cin + cout) + pairs * math.sqrt(cin + cout),
            "plain_mults": pairs * diag, "relu_cts": 0}


def estimate(layers: list[dict], costs: OpCosts, slots: int) -> list[dict]:
    """Projected seconds per layer (and the op counts behind them)."""
    out = []
    for layer in layers:
        ops = layer_ops(layer, slots)
        seconds = (ops["rotations"] * costs.rotation_s + ops["plain_mults"] * costs.plain_mult_s
                   + ops["relu_cts"] * (costs.relu_s + costs.bootstraps_per_relu * costs.bootstrap_s))
        out.append({"name": layer["name"], **ops, "seconds": seconds})
    return out


def op_costs_from_pass(counts: dict, seconds: dict, bootstrap_s: float) -> OpCosts:
    """Per-op costs for `estimate` from a (predicted) pass of the small DenseNet: its
    level-aware seconds per category (`fhe_eval.predict_seconds`) over its op counts, so
    each op is priced at the levels the engine runs it at; a ReLU is its polynomial stages
    plus its x * sign product, and its share of the pass's bootstraps."""
    relus = max(1, counts["relus"])
    return OpCosts(rotation_s=seconds["rotations"] / max(1, counts["rotations"]),
                   plain_mult_s=seconds["plain_mults"] / max(1, counts["plain_mults"]),
                   relu_s=(seconds["polys"] + seconds["ct_mults"]) / relus,
                   bootstrap_s=bootstrap_s, bootstraps_per_relu=counts["bootstraps"] / relus)


def main(argv: list[str]) -> int:
    """python -m backends.he.fhe_estimate PRIMITIVES.json [RESOLUTION]: the small DenseNet's
    predicted encrypted pass and the DenseNet-121 224 px per-layer projection, from the
    per-primitive seconds `backends.he.fhe_primitives` measured (both ESTIMATES)."""
    import json
    from pathlib import Path

    from backends.he.fhe_compile import compile_densenet
    from backends.he.fhe_eval import predict_counts, predict_seconds
    from suite.models import DENSENET121, random_small_densenet

    prim = json.loads(Path(argv[0]).read_text())
    res = int(argv[1]) if len(argv) > 1 else 64
    if "bootstrap_s" not in prim or "level_after_bootstrap" not in prim:
        raise SystemExit(f"{argv[0]} has no bootstrap measurement: run fhe_primitives without --no-roll-key")
    slots = prim["slots"]
    prog = compile_densenet(random_small_densenet(["a", "b", "c"], res, seed=0).net, res, slots)
    counts = predict_counts(prog, prim["max_level"], prim["level_after_bootstrap"])
    secs = predict_seconds(counts, prim)
    print(json.dumps({"estimate": "projected from measured per-primitive seconds", "resolution": res,
                      "relu_stages": list(prog.relu_stages), "counts": counts, "seconds": secs}, indent=1))
    costs = op_costs_from_pass(counts, secs, prim["bootstrap_s"])
    a = DENSENET121
    layers = estimate(densenet_layers(a["growth_rate"], tuple(a["block_config"]), a["num_init_features"],
                                      a["bn_size"], 224), costs, slots)
    total = sum(x["seconds"] for x in layers)
    print(f"DenseNet-121 224 px (projected): {total:.0f} s per image; per-op costs {costs}")
    for x in layers:
        print(f"  {x['name']:<24} {x['seconds']:10.1f} s  rot {x['rotations']:8.0f}  pmul {x['plain_mults']:9.0f}"
              f"  relu cts {x['relu_cts']:5.0f}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
