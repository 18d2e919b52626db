"""The secure-friendly DenseNet graph, free of torch: plan dataclasses and `run_plan`.

`backends.mpc.plan` builds a `Plan` from a torch model (BatchNorm folded, poolings
reordered); this module holds what every engine needs to *execute* one: CrypTen's parties
(torch), the plaintext reference (`mpc_plan.TorchOps`) and the SPU parties, which run in
their own virtual environment without torch and trace `run_plan` into a JAX function. One
graph, several engines: what the plaintext tests check is what runs under each protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRE_MODES = ("mul", "split")
#: value the max-pool pads with (real units); far below any activation, far above ring overflow
POOL_PAD = -(2.0 ** 20)
#: public input scaling: xrv pixels in [-1024, 1024] -> [-1, 1]
INPUT_SCALE = 2.0 ** -10


@dataclass
class Conv:
    w: str
    b: str | None
    stride: int = 1
    padding: int = 0


@dataclass
class Pre:
    """Per-channel pre-activation relu(s * x + t); params named by `prefix`."""
    mode: str
    s: str | None      # "mul": shared scale s
    t: str             # "mul": shift t;  "split": u = t / s


@dataclass
class Layer:
    pre: Pre
    conv1: Conv
    conv2: Conv


@dataclass
class Transition:
    pre: Pre
    conv: Conv


@dataclass
class Plan:
    """DenseNet as secure-friendly ops. `shapes` is what the data owner learns (architecture)."""
    stem: Conv
    pool: tuple[int, int, int]            # max-pool kernel, stride, padding
    blocks: list[list[Layer]]
    transitions: list[Transition]
    final: Pre
    fc_w: str
    fc_b: str
    pre_mode: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # the data owner multiplies its images by this public power of two before sharing and the
    # model owner divides conv0's weights by it: both exact, and it balances fixed-point
    # precision between the [-1024, 1024] pixels and conv0's (BN-folded, hence tiny) weights
    input_scale: float = INPUT_SCALE
    # the classifier's weights are divided by this public power of two (>= 1) so that its
    # products stay as small as every other layer's (`mpc_plan.balance_channels`); the
    # logits are multiplied back by it, an exact multiplication by a public integer
    output_scale: int = 1

    def n_params(self) -> int:
        n = 0
        for shape in self.shapes.values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n


# --------------------------------------------------------------------------- execution

def run_plan(plan: Plan, params: dict[str, Any], x: Any, ops: Any) -> Any:
    """Logits for images x (already multiplied by `plan.input_scale`), using `ops` (plaintext
    TorchOps or CrypTen ops) and `params`."""
    h = ops.conv(x, params[plan.stem.w], params[plan.stem.b], plan.stem.stride, plan.stem.padding)
    k, s, p = plan.pool
    h = ops.relu(max_pool_separable(h, k, s, p, ops))
    for i, block in enumerate(plan.blocks):
        for layer in block:
            a = pre_activation(h, layer.pre, params, ops)
            a = ops.relu(ops.conv(a, params[layer.conv1.w], params[layer.conv1.b], 1, 0))
            c2 = layer.conv2
            n = ops.conv(a, params[c2.w], params[c2.b] if c2.b else None, c2.stride, c2.padding)
            h = ops.cat([h, n], dim=1)
        if i < len(plan.transitions):
            t = plan.transitions[i]
            a = ops.sum_pool2(pre_activation(h, t.pre, params, ops))
            h = ops.conv(a, params[t.conv.w], params[t.conv.b], 1, 0)
    a = pre_activation(h, plan.final, params, ops)
    a = ops.global_avg(a)
    logits = ops.linear(a, params[plan.fc_w], params[plan.fc_b])
    return logits if plan.output_scale == 1 else logits * int(plan.output_scale)


def pre_activation(x: Any, pre: Pre, params: dict[str, Any], ops: Any) -> Any:
    if pre.mode == "mul":
        return ops.relu(ops.add(ops.mul(x, params[pre.s]), params[pre.t]))
    z = ops.add(x, params[pre.t])
    return ops.cat([ops.relu(z), z], dim=1)


def max_pool_separable(x: Any, k: int, s: int, p: int, ops: Any) -> Any:
    """k x k max-pool (stride s, padding p) as a k-wide max along W, then along H.

    Each 1-D pass pads with POOL_PAD (a public constant below any activation) and reduces
    the k strided slices pairwise, max(a, b) = b + relu(a - b): k-1 comparisons per output
    of the pass in ceil(log2 k) rounds. For DenseNet's 3x3/2 stem pool that is ~6
    comparisons per pooled value in 4 rounds (2 per row-window on twice as many rows, then 2),
    against 8 for a 9-way tree and ~30 plus an argmax one-hot and random tie-breaking in
    CrypTen's max_pool2d. The stem's ReLU then runs on the pooled map (they commute).
    """
    for dim in (3, 2):
        x = _max_1d(x, dim, k, s, p, ops)
    return x


def _max_1d(x: Any, dim: int, k: int, s: int, p: int, ops: Any) -> Any:
    n = x.shape[dim] if hasattr(x, "shape") else x.size(dim)
    if p:
        x = ops.pad(x, dim, p, POOL_PAD)
    length = (n + 2 * p - k) // s + 1
    slices = [ops.strided(x, dim, i, s, length) for i in range(k)]
    while len(slices) > 1:
        half = len(slices) // 2
        merged = ops.maximum_many(slices[:half], slices[half:2 * half])
        slices = merged + slices[2 * half:]
    return slices[0]


# --------------------------------------------------------------------------- skeleton

def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The architecture only (names, shapes, strides): what party 0 sends party 1.

    Plain builtins, so it passes CrypTen's restricted unpickler.
    """
    from dataclasses import asdict

    return asdict(plan)


def plan_from_dict(d: dict[str, Any]) -> Plan:
    def pre(p):
        return Pre(**p)

    def layer(l):
        return Layer(pre(l["pre"]), Conv(**l["conv1"]), Conv(**l["conv2"]))

    return Plan(stem=Conv(**d["stem"]), pool=tuple(d["pool"]),
                blocks=[[layer(l) for l in block] for block in d["blocks"]],
                transitions=[Transition(pre(t["pre"]), Conv(**t["conv"])) for t in d["transitions"]],
                final=pre(d["final"]), fc_w=d["fc_w"], fc_b=d["fc_b"], pre_mode=d["pre_mode"],
                shapes={k: tuple(v) for k, v in d["shapes"].items()}, input_scale=d["input_scale"],
                output_scale=int(d.get("output_scale", 1)))
