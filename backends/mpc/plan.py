"""The model owner's side of secure DenseNet inference: fold BatchNorm, then a plan.

A torchxrayvision DenseNet is rewritten, in plaintext by the model owner before anything
is secret-shared, into a `Plan`: a small list of convolutions, per-channel pre-activation
maps, poolings and a classifier whose parameters live in one dict (name -> tensor). The
same `run_plan` then executes it on plaintext torch tensors (`TorchOps`, for tests) or on
CrypTen shares (`backends.mpc.crypten_party.CrypTenOps`), so what the tests check in plaintext is
the code path that runs under MPC.

What is folded, and why it is exact (s = gamma / sqrt(var + eps), t = beta - mean * s):

* norm0 follows conv0 with nothing in between: conv0 weights * s, bias t.
* norm2 follows conv1 (1x1) directly: conv1 weights * s, bias t.
* relu0 -> pool0: max-pooling commutes with ReLU (both monotone), so the stem computes
  conv0 -> max-pool -> ReLU: the ReLU runs on the 4x smaller pooled map.
* transition: norm -> relu -> conv1x1 -> avgpool2x2. A 1x1 convolution and an average
  pool are both linear and per-pixel / per-channel respectively, so they commute; the
  stem pools first (a local sum of shares) and the 1/4 goes into the conv weights.
* global average pool: a local sum of shares, then division by the public integer H*W
  (local truncation, exact to one least significant bit).
* norm1 / transition norm / norm5 are *pre-activation*: each consumer of the concatenated
  features applies its own per-channel affine before a ReLU, so it cannot be folded into
  the producers (every channel has several consumers with different affines) nor into the
  following conv (the ReLU is in between). Two exact translations are offered
  (`pre_mode`):
    - "mul":   relu(s * x + t) with s, t secret-shared: one secure elementwise
               multiplication per pre-activation (the weights are the model owner's secret,
               so multiplying by a shared s is a Beaver multiplication).
    - "split": with z = x + t/s (a free addition of a shared constant),
               relu(s*z) = |s| * relu(z) + min(s, 0) * z   (exact for either sign of s),
               so the consumer's linear map takes [relu(z), z] with weights
               [W*|s|, W*min(s,0)]: no secure elementwise multiplication, and the sign of
               each s stays secret. Channels with s == 0 are constant relu(t): their
               weights are zero and W[:, c] * relu(t_c) goes into the bias. Cost: the
               consumer's input channels double (extra conv work and opened values in the
               same round), and precision degrades when |t/s| is large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from backends.mpc.graph import (  # noqa: F401  (re-exported: the plan's public names)
    INPUT_SCALE, POOL_PAD, PRE_MODES, Conv, Layer, Plan, Pre, Transition, max_pool_separable,
    plan_from_dict, plan_to_dict, pre_activation, run_plan,
)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = s * x + t (float64)."""
    var = bn.running_var.double()
    s = (bn.weight.double() if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
    return s, beta - bn.running_mean.double() * s


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(conv(x)) as one conv: exact (no nonlinearity between them)."""
    s, t = bn_affine(bn)
    w = conv.weight.double() * s[:, None, None, None]
    b = t if conv.bias is None else conv.bias.double() * s + t
    return w, b


def _split_pre(w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold relu(s*x+t) ahead of a linear map (w: [out, C, ...]) as relu(z), z with z = x + u.

    Returns (weights over [relu(z), z] channels, bias, u).
    """
    zero = s == 0
    u = torch.where(zero, torch.zeros_like(t), t / torch.where(zero, torch.ones_like(s), s))
    view = (1, -1) + (1,) * (w.dim() - 2)
    w_rel = w * s.abs().view(view)
    w_lin = w * torch.clamp(s, max=0).view(view)
    const = torch.where(zero, torch.relu(t), torch.zeros_like(t))       # constant channels
    w_rel = torch.where(zero.view(view), torch.zeros_like(w_rel), w_rel)
    w_lin = torch.where(zero.view(view), torch.zeros_like(w_lin), w_lin)
    extra = (w.sum(dim=tuple(range(2, w.dim()))) * const[None, :]).sum(1) if w.dim() > 2 \
        else (w * const[None, :]).sum(1)
    return torch.cat([w_rel, w_lin], dim=1), b + extra, u


def build_plan(net: nn.Module, pre_mode: str = "split") -> tuple[Plan, dict[str, torch.Tensor]]:
    """Fold and translate an eval-mode xrv/torchvision DenseNet. Returns (plan, params)."""
    if pre_mode not in PRE_MODES:
        raise ValueError(f"pre_mode must be one of {PRE_MODES}, got {pre_mode!r}")
    _check_supported(net)
    params: dict[str, torch.Tensor] = {}
    feats = net.features

    def put(name: str, value: torch.Tensor) -> str:
        params[name] = value.detach().double().contiguous()
        return name

    def pre(prefix: str, bn: nn.BatchNorm2d, w: torch.Tensor, b: torch.Tensor | None
            ) -> tuple[Pre, torch.Tensor, torch.Tensor]:
        s, t = bn_affine(bn)
        b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b
        if pre_mode == "mul":
            # the pre-activation always acts on a [B, C, H, W] feature map
            return Pre("mul", put(f"{prefix}.s", s.view(1, -1, 1, 1)),
                       put(f"{prefix}.t", t.view(1, -1, 1, 1))), w, b
        w2, b2, u = _split_pre(w, b, s, t)
        return Pre("split", None, put(f"{prefix}.u", u.view(1, -1, 1, 1))), w2, b2

    conv0 = feats.conv0
    w0, b0 = fold_bn_into_conv(conv0, feats.norm0)
    stem = Conv(put("conv0.w", w0 / INPUT_SCALE), put("conv0.b", b0), conv0.stride[0], conv0.padding[0])
    pool0 = feats.pool0
    pool = tuple(int(v if isinstance(v, int) else v[0]) for v in (pool0.kernel_size, pool0.stride, pool0.padding))

    blocks: list[list[Layer]] = []
    transitions: list[Transition] = []
    names = [n for n, _ in feats.named_children()]
    for name in names:
        mod = getattr(feats, name)
        if name.startswith("denseblock"):
            layers = []
            for lname, layer in mod.named_children():
                p = f"{name}.{lname}"
                w1, b1 = fold_bn_into_conv(layer.conv1, layer.norm2)
                pr, w1, b1 = pre(f"{p}.norm1", layer.norm1, w1, b1)
                c1 = Conv(put(f"{p}.conv1.w", w1), put(f"{p}.conv1.b", b1))
                c2 = layer.conv2
                conv2 = Conv(put(f"{p}.conv2.w", c2.weight), put(f"{p}.conv2.b", c2.bias) if c2.bias is not None else None,
                             c2.stride[0], c2.padding[0])
                layers.append(Layer(pr, c1, conv2))
            blocks.append(layers)
        elif name.startswith("transition"):
            conv = mod.conv
            pr, w, b = pre(f"{name}.norm", mod.norm, conv.weight.double(),
                           conv.bias.double() if conv.bias is not None else None)
            # avgpool2x2 before the 1x1 conv (they commute); its 1/4 goes into the weights
            transitions.append(Transition(pr, Conv(put(f"{name}.conv.w", w / 4.0), put(f"{name}.conv.b", b))))
    fc = net.classifier
    pr, w, b = pre("norm5", feats.norm5, fc.weight.double(), fc.bias.double())
    plan = Plan(stem=stem, pool=pool, blocks=blocks, transitions=transitions, final=pr,
                fc_w=put("fc.w", w), fc_b=put("fc.b", b), pre_mode=pre_mode)
    plan.shapes = {k: tuple(v.shape) for k, v in params.items()}
    return plan, params


def _check_supported(net: nn.Module) -> None:
    """Refuse models whose forward differs from the plan (dropout at eval is fine)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and not m.track_running_stats:
            raise ValueError("BatchNorm without running statistics cannot be folded")
    pool = net.features.pool0
    if not isinstance(pool, nn.MaxPool2d) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
        raise ValueError("stem pool must be a plain MaxPool2d")


class TorchOps:
    """Plaintext float64 ops with the same interface as the CrypTen ops."""

    def conv(self, x, w, b, stride, padding):
        return F.conv2d(x, w, b, stride=stride, padding=padding)

    def linear(self, x, w, b):
        return F.linear(x, w, b)

    def relu(self, x):
        return torch.relu(x)

    def maximum_many(self, a_list, b_list):
        return [torch.maximum(a, b) for a, b in zip(a_list, b_list)]

    def mul(self, x, s):
        return x * s

    def add(self, x, t):
        return x + t

    def cat(self, xs, dim):
        return torch.cat(xs, dim=dim)

    def pad(self, x, dim, p, value):
        pads = [0, 0] * (x.dim() - dim - 1) + [p, p]
        return F.pad(x, pads, value=value)

    def strided(self, x, dim, start, step, length):
        return x.narrow(dim, start, (length - 1) * step + 1)[(slice(None),) * dim + (slice(None, None, step),)]

    def sum_pool2(self, x):
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        x = x[:, :, :h, :w]
        return x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]

    def global_avg(self, x):
        return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])


class RangeOps(TorchOps):
    """TorchOps that record the products a secure engine must truncate (conv, linear, mul and
    the global sum, before their bias): the largest |value| and the sum of |value| per image."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.max_abs_relu = 0.0         # every ReLU's input (not the max-pool's differences)

    def relu(self, x):
        self.max_abs_relu = max(self.max_abs_relu, float(x.abs().max())) if x.numel() else self.max_abs_relu
        return torch.relu(x)

    def _seen(self, y: torch.Tensor) -> torch.Tensor:
        self.max_abs = max(self.max_abs, float(y.abs().max()))
        self.sum_abs += float(y.abs().sum())
        return y

    def conv(self, x, w, b, stride, padding):
        y = self._seen(F.conv2d(x, w, None, stride=stride, padding=padding))
        return y if b is None else y + b.view(1, -1, 1, 1)

    def linear(self, x, w, b):
        return self._seen(F.linear(x, w)) + b

    def mul(self, x, s):
        return self._seen(x * s)

    def global_avg(self, x):
        return self._seen(x.sum(dim=(2, 3))) / (x.shape[2] * x.shape[3])


@dataclass
class Calibration:
    """The model owner's plaintext pass over calibration images: what fixed point must hold."""
    images: int
    max_abs_product: float
    sum_abs_products_per_image: float
    logit_error: float | None = None      # `predicted_logit_error` at the chosen precision
    max_abs_relu_input: float = 0.0
    #: width of the ReLU's comparison: NARROW_BITS (|input| * 2^p < 2^32 with the headroom
    #: below) or 64 (the full carry circuit); chosen in `model_owner_fixed_point`
    comparison_bits: int = 64

    def comparison_headroom_bits(self, precision_bits: int) -> float:
        """log2 of (the narrow comparison's range 2^32 / the largest ReLU input's encoding)."""
        from backends.mpc.protocol import NARROW_BITS

        return NARROW_BITS - precision_bits - math.log2(max(self.max_abs_relu_input, 2.0 ** -30))

    def narrow_precision(self) -> int:
        """The most fractional bits that leave RANGE_HEADROOM_BITS below the narrow comparison's
        range on every ReLU input."""
        return math.floor(self.comparison_headroom_bits(0) - RANGE_HEADROOM_BITS)

    def headroom_bits(self, precision_bits: int) -> float:
        """log2 of (ring's signed range / largest product encoding) at this precision."""
        return 63 - 2 * precision_bits - math.log2(max(self.max_abs_product, 2.0 ** -30))

    def local_failures_per_image(self, precision_bits: int) -> float:
        """Expected wrong truncations per image with local (probabilistic) truncation."""
        return self.sum_abs_products_per_image * 2.0 ** (2 * precision_bits - 64)

    def auto_precision(self) -> int:
        """The most fractional bits (at most MAX_AUTO_PRECISION) leaving RANGE_HEADROOM_BITS."""
        bits = MAX_AUTO_PRECISION
        while bits > 8 and self.headroom_bits(bits) < RANGE_HEADROOM_BITS:
            bits -= 1
        return bits


#: bits kept free above the largest calibrated product: activations on the data owner's
#: images may exceed the calibration images' by this factor (2^8 = 256x) before overflow
RANGE_HEADROOM_BITS = 8
#: auto precision stops here: beyond it the plan's own float64 rounding is the limit
MAX_AUTO_PRECISION = 24


def calibrate(plan: Plan, params: dict[str, torch.Tensor], images: torch.Tensor) -> Calibration:
    """Run the plan in plaintext on the model owner's calibration images ([N, 1, H, W], xrv
    range) and measure the products a secure engine truncates."""
    ops = RangeOps()
    with torch.no_grad():
        run_plan(plan, params, images.double() * plan.input_scale, ops)
    n = int(images.shape[0])
    return Calibration(images=n, max_abs_product=ops.max_abs, sum_abs_products_per_image=ops.sum_abs / n,
                       max_abs_relu_input=ops.max_abs_relu)


def choose_precision(requested: int, truncation: str, cal: Calibration) -> int:
    """Fixed-point fractional bits for this model: `requested`, or automatic when 0 (exact
    truncation: the most the calibrated range allows; local truncation: CrypTen's 16, since
    more bits raise its failure rate). Refuses a precision that overflows on calibration."""
    bits = requested or (cal.auto_precision() if truncation == "exact" else 16)
    if cal.headroom_bits(bits) < 1:
        raise ValueError(
            f"precision_bits={bits} overflows: the largest product on the model owner's "
            f"{cal.images} calibration images is {cal.max_abs_product:.3g}, and at {bits} bits "
            f"its encoding exceeds the 64-bit ring; use at most {cal.auto_precision()} bits "
            f"(precision_bits=0 chooses automatically)")
    return bits


def model_owner_precision(plan: Plan, params: dict[str, torch.Tensor], resolution: int, requested: int,
                          truncation: str) -> tuple[Calibration, int]:
    """The model owner's calibration on public images and the precision it implies (raises
    ValueError as `choose_precision` does); the data owner is told only the precision."""
    cal = calibrate(plan, params, public_calibration_images(resolution))
    return cal, choose_precision(requested, truncation, cal)


def gate_fixed_point(triples: str, relu: str) -> dict[str, object]:
    """`model_owner_fixed_point`'s protocol arguments for these gates: the narrow ReLU
    comparison needs the dealer's masks and the packed ReLU; truncation pairs (the dealer's)
    round otherwise than the carry circuit."""
    return {"narrow_relu": triples == "ttp" and relu == "packed",
            "rounding": "pair" if triples == "ttp" else "circuit"}


def model_owner_fixed_point(plan: Plan, params: dict[str, torch.Tensor], resolution: int, requested: int,
                            truncation: str, scaling: str = "channels", narrow_relu: bool = False,
                            rounding: str = "pair") -> tuple[Plan, dict[str, torch.Tensor], Calibration, int]:
    """What the model owner shares: its plan and parameters, rescaled per channel on its public calibration
    images (`scaling="channels"`, see `balance_channels`; "none" keeps them), the calibration of
    the plan it will run and the precision it implies.

    narrow_relu (the dealer's protocol): every ReLU may use the 32-bit comparison when its inputs
    leave RANGE_HEADROOM_BITS below 2^32 on calibration (`cal.comparison_bits`); automatic
    precision gives up at most NARROW_TRADE_BITS fractional bits for it, a requested one none.
    rounding: how the secure truncation rounds ("pair" with the dealer, "circuit" without;
    `FixedPointOps`)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    images = public_calibration_images(resolution)
    if scaling == "channels":
        plan, params = balance_channels(plan, params, images)
    cal = calibrate(plan, params, images)
    bits = choose_precision(requested, truncation, cal)
    if narrow_relu and truncation == "exact":
        fit = cal.narrow_precision()
        if fit >= bits or (not requested and fit >= max(8, bits - NARROW_TRADE_BITS)):
            bits, cal.comparison_bits = min(bits, fit), 32
    if truncation == "exact":
        cal.logit_error = predicted_logit_error(plan, params, images[:EMULATED_IMAGES], bits, rounding)
        worst_dp = cal.logit_error / 4          # sigmoid's slope is at most 1/4
        if not requested and worst_dp > FIDELITY_BAR:
            raise ValueError(
                f"this model cannot be run within max |dp| <= {FIDELITY_BAR:g} of plaintext: at the "
                f"{bits} fractional bits its largest product allows ({cal.max_abs_product:.3g} on the "
                f"calibration images), fixed point moves its logits by up to {cal.logit_error:.2g} "
                f"(|dp| up to {worst_dp:.2g})" + ("; use scaling=channels" if scaling == "none" else "")
                + "; precision_bits=N runs it anyway")
    return plan, params, cal, bits


#: fractional bits automatic precision may give up so that the ReLUs fit the narrow comparison
NARROW_TRADE_BITS = 1
#: the largest |probability difference| against plaintext an MPC row may have
FIDELITY_BAR = 1e-3
#: calibration images the fixed-point emulation runs on (two plaintext passes each)
EMULATED_IMAGES = 2


class FixedPointOps(TorchOps):
    """Plaintext emulation of the CrypTen path's fixed point at `bits` fractional bits: weights,
    biases and shifts rounded to the grid, every product truncated as `TwoPartyGates.truncate`
    does. With the dealer's truncation pairs (rounding="pair", the default) that is floor plus
    the dropped borrow [z mod 2^d < r mod 2^d], which for a uniform r is 1 with probability
    frac(y * 2^p): stochastic rounding, floor or one ulp up. The carry circuit (rounding=
    "circuit", CrypTen's trusted first party) drops the low bits' carry instead, 1 with
    probability 1 - frac: one ulp below that."""

    def __init__(self, bits: int, seed: int = 0, rounding: str = "pair") -> None:
        if rounding not in ("pair", "circuit"):
            raise ValueError(f"rounding must be pair or circuit, got {rounding!r}")
        self.scale = 2.0 ** bits
        self.rounding = rounding
        self._gen = torch.Generator().manual_seed(seed)    # emulation noise, not a secret

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t * self.scale) / self.scale

    def _truncated(self, y: torch.Tensor) -> torch.Tensor:
        v = y * self.scale
        low = torch.floor(v)
        up = (torch.rand(y.shape, generator=self._gen, dtype=torch.float64) < v - low).double()
        return (low + up - (1.0 if self.rounding == "circuit" else 0.0)) / self.scale

    def conv(self, x, w, b, stride, padding):
        y = self._truncated(F.conv2d(x, self.grid(w), None, stride=stride, padding=padding))
        return y if b is None else y + self.grid(b).view(1, -1, 1, 1)

    def linear(self, x, w, b):
        return self._truncated(F.linear(x, self.grid(w))) + self.grid(b)

    def mul(self, x, s):
        return self._truncated(x * self.grid(s))

    def add(self, x, t):
        return x + self.grid(t)

    def global_avg(self, x):
        hw = x.shape[2] * x.shape[3]
        return x.sum(dim=(2, 3)) if hw == 1 else \
            self._truncated(x.sum(dim=(2, 3)) * (round(self.scale / hw) / self.scale))


def predicted_logit_error(plan: Plan, params: dict[str, torch.Tensor], images: torch.Tensor,
                          bits: int, rounding: str = "pair") -> float:
    """Largest |logit change| fixed point at `bits` causes on `images` (the model owner's
    plaintext emulation; on a random DenseNet-121 at 224 px it predicted 3.4e-2 at 19 bits and
    the secure run measured ...)."""
    ops = FixedPointOps(bits, rounding=rounding)
    x = images.double() * plan.input_scale
    with torch.no_grad():
        exact = run_plan(plan, params, x, TorchOps())
        fixed = run_plan(plan, params, ops.grid(x), ops)
    return float((fixed - exact).abs().max())


SCALINGS = ("channels", "none")
#: a channel's scale stays within 2^-MAX_SCALE_EXP .. 2^MAX_SCALE_EXP (a dead channel keeps 1)
MAX_SCALE_EXP = 30


class ChannelMaxOps(TorchOps):
    """TorchOps that record, for every convolution, each output channel's largest |value|
    (before and after its bias), keyed by the convolution's weight name."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self._names = {id(t): n for n, t in params.items()}
        self.maxima: dict[str, torch.Tensor] = {}

    def conv(self, x, w, b, stride, padding):
        y = F.conv2d(x, w, None, stride=stride, padding=padding)
        m = y.abs().amax(dim=(0, 2, 3))
        if b is not None:
            y = y + b.view(1, -1, 1, 1)
            m = torch.maximum(m, y.abs().amax(dim=(0, 2, 3)))
        self._keep(self._names[id(w)], m)
        return y

    def mul(self, x, s):            # pre_mode "mul": relu(s * x + t), keyed by s's and t's names
        y = x * s
        self._keep(self._names[id(s)], y.abs().amax(dim=(0, 2, 3)))
        return y

    def add(self, x, t):
        y = x + t
        self._keep(self._names[id(t)], y.abs().amax(dim=(0, 2, 3)))
        return y

    def _keep(self, name: str, m: torch.Tensor) -> None:
        self.maxima[name] = torch.maximum(self.maxima[name], m) if name in self.maxima else m


def balance_channels(plan: Plan, params: dict[str, torch.Tensor], images: torch.Tensor
                     ) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Rescale every feature channel to a largest |value| near 1 on `images`: same logits.

    Why: fixed point has one absolute resolution 2^-p, and p is bounded by the largest product
    anywhere (`Calibration.auto_precision`). In a DenseNet with uncalibrated BatchNorm (random
    DenseNet-121: activations ~1e5 at 224 px) that largest product forces few bits on every
    layer, so the weights' rounding dominates the error (max |dlogit| ~3e-2 at 19 bits). ReLU,
    max-pooling, sum-pooling, concatenation and the split pre-activation relu(z), z are all
    positively homogeneous per channel, so the model owner may multiply each convolution's
    output channel by a power of two a > 0 (its weights and bias) and divide every consumer's
    weights on that channel by a (shifting u = t/s by a, or s by 1/a in pre_mode "mul").
    The classifier's weights are divided by a public power of two (`Plan.output_scale`) that
    brings its largest logit near 1, and the shared logits are multiplied back by it (a public
    integer: exact). Everything is a power of two, so the float64 plan is unchanged bit for
    bit; the largest product becomes the global average's sum (~H*W/1024), and the precision
    it allows is higher (random DenseNet-121 at 224 px: 24 bits instead of 19).
    """
    ops = ChannelMaxOps(params)
    with torch.no_grad():
        logits = run_plan(plan, params, images.double() * plan.input_scale, ops)
    p = dict(params)

    def scale_for(conv: Conv | None, m: torch.Tensor | None = None) -> torch.Tensor:
        m = ops.maxima[conv.w] if m is None else m
        e = torch.where(m > 0, -torch.round(torch.log2(torch.where(m > 0, m, torch.ones_like(m)))),
                        torch.zeros_like(m)).clamp(-MAX_SCALE_EXP, MAX_SCALE_EXP)
        return torch.pow(2.0, e)

    def scale_outputs(conv: Conv, a: torch.Tensor) -> None:
        p[conv.w] = p[conv.w] * a.view((-1,) + (1,) * (p[conv.w].dim() - 1))
        if conv.b is not None:
            p[conv.b] = p[conv.b] * a

    def divide_inputs(w: str, a: torch.Tensor) -> None:
        p[w] = p[w] / a.view((1, -1) + (1,) * (p[w].dim() - 2))

    def scale_pre(pre: Pre, a: torch.Tensor, consumer_w: str) -> None:
        if pre.mode == "split":           # z = x + u scales with x: u by a, consumer by 1/a on [relu(z), z]
            p[pre.t] = p[pre.t] * a.view(1, -1, 1, 1)
            divide_inputs(consumer_w, torch.cat([a, a]))
        else:                             # relu(s * x + t): s / a absorbs a; its output gets a scale g
            g = scale_for(None, torch.maximum(ops.maxima[pre.s], ops.maxima[pre.t]))
            p[pre.s] = p[pre.s] * (g / a).view(1, -1, 1, 1)
            p[pre.t] = p[pre.t] * g.view(1, -1, 1, 1)
            divide_inputs(consumer_w, g)

    alpha = scale_for(plan.stem)
    scale_outputs(plan.stem, alpha)
    for i, block in enumerate(plan.blocks):
        for layer in block:
            scale_pre(layer.pre, alpha, layer.conv1.w)
            beta = scale_for(layer.conv1)
            scale_outputs(layer.conv1, beta)
            divide_inputs(layer.conv2.w, beta)
            gamma = scale_for(layer.conv2)
            scale_outputs(layer.conv2, gamma)
            alpha = torch.cat([alpha, gamma])
        if i < len(plan.transitions):
            t = plan.transitions[i]
            scale_pre(t.pre, alpha, t.conv.w)
            alpha = scale_for(t.conv)
            scale_outputs(t.conv, alpha)
    scale_pre(plan.final, alpha, plan.fc_w)
    largest = float(logits.abs().max()) / plan.output_scale if logits.numel() else 0.0
    k = min(MAX_SCALE_EXP, math.floor(math.log2(largest))) if largest > 1 else 0
    p[plan.fc_w], p[plan.fc_b] = p[plan.fc_w] / 2 ** k, p[plan.fc_b] / 2 ** k
    plan = replace(plan, output_scale=plan.output_scale * 2 ** k)
    return plan, {name: v.contiguous() for name, v in p.items()}


def public_calibration_images(resolution: int, n_per_site: int = 2, seed: int = 20261122) -> torch.Tensor:
    """Calibration images the model owner can make without anyone's data: the suite's
    synthetic chest X-ray phantoms (public generator) at the model's input resolution."""
    from suite.data.synthetic import generate_synthetic

    data = generate_synthetic(n_train_per_site=n_per_site, n_test_per_site=0, size=resolution, seed=seed)
    return torch.from_numpy(data.images)


def plaintext_logits(net: nn.Module, x: torch.Tensor, pre_mode: str = "split") -> torch.Tensor:
    """The folded plan run in plaintext float64 (what the tests compare with the model)."""
    plan, params = build_plan(net, pre_mode)
    with torch.no_grad():
        return run_plan(plan, params, x.double() * plan.input_scale, TorchOps())
