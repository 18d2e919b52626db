"""The model owner's compiler: the suite's DenseNet -> an FHE `Program` (slot-vector ops).

Exact rewrites (checked by `Program.run_plain(exact=True)` against the model):
  * BatchNorm folded into the neighbouring convolution (norm0 -> conv0, norm2 -> conv1),
    via `backends.mpc.plan.build_plan` (the same folding the MPC engines run);
  * pre-activation BatchNorm (norm1, transition norm, norm5) as a diagonal linear op;
  * no concatenation: a DenseNet layer's conv2 writes its new channels into the block
    register at their channel offset, adding to what is there (conv over a concat = sum
    of convs over the parts);
  * the stride-2 stem convolution as a stride-1 convolution over the 4 polyphase
    components of the image (the data owner packs its image in that public order);
  * max-pool 3x3/2 as max along W then along H, max(a, b) = b + relu(a - b), each tap
    selection a linear op that also compacts; avg-pool 2x2 + 1x1 conv (transition) and
    global average pool + classifier as linear ops.
Stated approximation: ReLU by a composite polynomial on [-1, 1] (`fhe_program.relu_approx`),
every register scaled by the model owner on public calibration images (the suite's
synthetic phantoms) with a safety margin so it stays inside [-1, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.he.fhe_program import SIGN_STAGES, Program

#: calibrated |value| * MARGIN = register scale: test images may exceed the public
#: calibration images' activations by this factor before the polynomial ReLU leaves [-1, 1]
MARGIN = 2.0


def _conv_pairs(w: np.ndarray, pad: int, H: int, W: int, in_c0: int = 0, out_c0: int = 0):
    """(rows, cols, vals) of a stride-1 convolution between compact channel-major maps."""
    co_n, ci_n, kh, kw = w.shape
    co, ci, dy, dx, y, x = np.meshgrid(np.arange(co_n), np.arange(ci_n), np.arange(kh), np.arange(kw),
                                       np.arange(H), np.arange(W), indexing="ij")
    iy, ix = y + dy - pad, x + dx - pad
    ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    rows = ((co + out_c0) * H + y) * W + x
    cols = ((ci + in_c0) * H + iy) * W + ix
    vals = w[co, ci, dy, dx]
    keep = ok & (vals != 0)
    return rows[keep].ravel(), cols[keep].ravel(), vals[keep].ravel()


def polyphase_pack(img: np.ndarray) -> np.ndarray:
    """[H, W] image -> 4 phases (row parity, column parity) of [H/2, W/2], flattened."""
    return np.concatenate([img[a::2, b::2].ravel() for a in (0, 1) for b in (0, 1)])


def _stem_pairs(w: np.ndarray, stride: int, pad: int, H: int, W: int):
    """conv0 (k x k, stride 2, pad p) on the polyphase-packed image as a stride-1 map."""
    assert stride == 2 and H % 2 == 0 and W % 2 == 0
    co_n, _, k, _ = w.shape
    Ho, Wo = (H + 2 * pad - k) // 2 + 1, (W + 2 * pad - k) // 2 + 1
    h2, w2 = H // 2, W // 2
    co, dy, dx, y, x = np.meshgrid(np.arange(co_n), np.arange(k), np.arange(k), np.arange(Ho),
                                   np.arange(Wo), indexing="ij")
    iy, ix = 2 * y + dy - pad, 2 * x + dx - pad
    ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    phase = (iy % 2) * 2 + ix % 2
    cols = (phase * h2 + iy // 2) * w2 + ix // 2
    rows = (co * Ho + y) * Wo + x
    vals = w[co, 0, dy, dx]
    return rows[ok].ravel(), cols[ok].ravel(), vals[ok].ravel(), Ho, Wo


class _Builder:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.ops: list[dict[str, Any]] = []

    def linear(self, dst, src, rows, cols, vals, bias=None, acc=False):
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        n = int(rows.max()) + 1 if rows.size else 0
        if max(n, int(cols.max()) + 1 if cols.size else 0) > self.slots:
            raise ValueError(f"register {dst} needs more than {self.slots} slots")
        self.ops.append({"op": "linear", "dst": dst, "src": src, "rows": rows, "cols": cols,
                         "vals": np.asarray(vals, np.float64),
                         "bias": np.zeros(0) if bias is None else np.asarray(bias, np.float64),
                         "acc": bool(acc)})

    def select(self, dst, src, rows, cols, weight=1.0):
        self.linear(dst, src, rows, cols, np.full(len(rows), weight))

    def relu(self, dst, src):
        self.ops.append({"op": "relu", "dst": dst, "src": src, "k": 1.0})

    def add(self, dst, a, b):
        self.ops.append({"op": "add", "dst": dst, "a": a, "b": b})

    def sub(self, dst, a, b):
        self.ops.append({"op": "sub", "dst": dst, "a": a, "b": b})


def _grid(*sizes):
    return [g.ravel() for g in np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")]


def _compact(b: _Builder, dst: str, src: str, C: int, H: int, W: int, Ho: int, Wo: int) -> None:
    """Valid [C, Ho, Wo] values at c*H*W + y*W + x -> compact c*Ho*Wo + y*Wo + x, in two
    shift-invariant steps (row width, then channel stride: Ho and C diagonals)."""
    c, y, x = _grid(C, Ho, Wo)
    b.select(f"{dst}.rw", src, c * H * W + y * Wo + x, c * H * W + y * W + x)
    b.select(dst, f"{dst}.rw", (c * Ho + y) * Wo + x, c * H * W + y * Wo + x)


def _pool_max(b: _Builder, src: str, C: int, H: int, W: int, k: int, s: int, p: int, tag: str) -> tuple[str, int, int]:
    """k x k / s max-pool (padding p) of compact [C, H, W] `src`: max along W, then along H,
    each tap selection keeping the channel and row strides (one diagonal per output column
    or row); padding taps select the window's centre instead (max(a, a) = a)."""
    Wo = (W + 2 * p - k) // s + 1
    Ho = (H + 2 * p - k) // s + 1

    def taps_w(j):
        c, y, x = _grid(C, H, Wo)
        ix = s * x + j - p
        ix = np.where((ix < 0) | (ix >= W), s * x + (k // 2) - p, ix)
        return (c * H + y) * W + x, (c * H + y) * W + ix

    def taps_h(j):
        c, y, x = _grid(C, Ho, Wo)
        iy = s * y + j - p
        iy = np.where((iy < 0) | (iy >= H), s * y + (k // 2) - p, iy)
        return (c * H + y) * W + x, (c * H + iy) * W + x

    cur = src
    for axis, taps in (("w", taps_w), ("h", taps_h)):
        base = f"{tag}.{axis}"
        r0, c0 = taps(0)
        b.select(f"{base}.m0", cur, r0, c0)
        m = f"{base}.m0"
        for j in range(1, k):
            rj, cj = taps(j)
            t = f"{base}.t{j}"
            b.select(t, cur, rj, cj)
            b.sub(f"{base}.d{j}", m, t)               # max(m, t) = t + relu(m - t)
            b.relu(f"{base}.r{j}", f"{base}.d{j}")
            b.add(f"{base}.m{j}", t, f"{base}.r{j}")
            m = f"{base}.m{j}"
        cur = m
    return cur, Ho, Wo


def compile_densenet(net, resolution: int, slots: int, calibration: np.ndarray | None = None,
                     margin: float = MARGIN, relu_stages: tuple[str, ...] = SIGN_STAGES) -> Program:
    """Fold and translate an eval-mode xrv DenseNet into a scaled `Program`.

    calibration: [N, 1, H, W] public images (xrv range) the register scales come from;
    None: the suite's synthetic phantoms (`backends.mpc.plan.public_calibration_images`)."""
    from backends.mpc.plan import build_plan, public_calibration_images

    plan, params = build_plan(net, "mul")
    P = {k: v.detach().double().numpy() for k, v in params.items()}
    b = _Builder(slots)
    H = W = int(resolution)
    # stem: conv0 (+norm0) over the polyphase image, then the max-pool, then ReLU
    rows, cols, vals, H, W = _stem_pairs(P[plan.stem.w], plan.stem.stride, plan.stem.padding, H, W)
    C = P[plan.stem.w].shape[0]
    b.linear("c0", "x", rows, cols, vals, np.repeat(P[plan.stem.b], H * W))
    k, s, p = plan.pool
    pooled, Ho, Wo = _pool_max(b, "c0", C, H, W, k, s, p, "pool0")
    _compact(b, "pool0.out", pooled, C, H, W, Ho, Wo)
    H, W = Ho, Wo
    b.relu("h0", "pool0.out")
    n_layers = 0
    for bi, block in enumerate(plan.blocks):
        for li, layer in enumerate(block):
            tag = f"b{bi}.l{li}"
            ci = C
            # pre-activation BN (diagonal) + ReLU
            _pre(b, f"{tag}.u", f"h{bi}", P[layer.pre.s], P[layer.pre.t], ci, H * W)
            b.relu(f"{tag}.a", f"{tag}.u")
            w1 = P[layer.conv1.w]
            r, c_, v = _conv_pairs(w1, 0, H, W)
            b.linear(f"{tag}.v", f"{tag}.a", r, c_, v, np.repeat(P[layer.conv1.b], H * W))
            b.relu(f"{tag}.a2", f"{tag}.v")
            w2 = P[layer.conv2.w]
            r, c_, v = _conv_pairs(w2, layer.conv2.padding, H, W, out_c0=ci)
            bias2 = None
            if layer.conv2.b:
                bias2 = np.concatenate([np.zeros(ci * H * W), np.repeat(P[layer.conv2.b], H * W)])
            b.linear(f"h{bi}", f"{tag}.a2", r, c_, v, bias2, acc=True)
            C = ci + w2.shape[0]
            n_layers += 1
        if bi < len(plan.transitions):
            t = plan.transitions[bi]
            tag = f"t{bi}"
            _pre(b, f"{tag}.u", f"h{bi}", P[t.pre.s], P[t.pre.t], C, H * W)
            b.relu(f"{tag}.a", f"{tag}.u")
            # 1x1 conv at full resolution (weights already carry the pool's 1/4) ...
            w = P[t.conv.w]
            r, c_, v = _conv_pairs(w, 0, H, W)
            b.linear(f"{tag}.c", f"{tag}.a", r, c_, v, np.repeat(P[t.conv.b] / 4.0, H * W))
            C = w.shape[0]
            # ... then the 2x2 sum pool (x, then y, keeping strides) and compaction
            Ho, Wo = H // 2, W // 2
            c, y, x, bb = _grid(C, H, Wo, 2)
            b.select(f"{tag}.px", f"{tag}.c", (c * H + y) * W + x, (c * H + y) * W + 2 * x + bb)
            c, y, x, a = _grid(C, Ho, Wo, 2)
            b.select(f"{tag}.py", f"{tag}.px", (c * H + y) * W + x, (c * H + 2 * y + a) * W + x)
            _compact(b, f"h{bi + 1}", f"{tag}.py", C, H, W, Ho, Wo)
            H, W = Ho, Wo
    # norm5 + ReLU + global average pool + classifier
    _pre(b, "f.u", f"h{len(plan.blocks) - 1}", P[plan.final.s], P[plan.final.t], C, H * W)
    b.relu("f.a", "f.u")
    fw, fb = P[plan.fc_w], P[plan.fc_b]
    L = fw.shape[0]
    l, c, q = np.meshgrid(np.arange(L), np.arange(C), np.arange(H * W), indexing="ij")
    b.linear("logits", "f.a", l.ravel(), (c * H * W + q).ravel(), (fw[l, c] / (H * W)).ravel(), fb)
    prog = Program(slots=slots, ops=b.ops, input_size=int(resolution) ** 2, n_labels=L,
                   relu_stages=tuple(relu_stages),
                   meta={"resolution": int(resolution), "input_scale": float(plan.input_scale),
                         "dense_layers": n_layers, "final_hw": H * W, "final_channels": C})
    if calibration is None:
        calibration = public_calibration_images(int(resolution)).numpy()
    return scale_program(prog, calibration, margin)


def _pre(b: _Builder, dst: str, src: str, s: np.ndarray, t: np.ndarray, C: int, HW: int) -> None:
    idx = np.arange(C * HW)
    b.linear(dst, src, idx, idx, np.repeat(s.reshape(-1)[:C], HW), np.repeat(t.reshape(-1)[:C], HW))


def pack_image(prog: Program, img: np.ndarray) -> np.ndarray:
    """The data owner's packing: xrv pixels [H, W] -> scaled polyphase vector (public order)."""
    return polyphase_pack(np.asarray(img, np.float64) * prog.meta["input_scale"]) / prog.meta.get("x_scale", 1.0)


def scale_program(prog: Program, images: np.ndarray, margin: float) -> Program:
    """Choose every register's scale from calibration images (true ReLU) and fold the scales
    into the ops, so every register holds value / scale in [-1, 1] (max-pool registers in
    [-1/2, 1/2], so their differences stay in [-1, 1]). `logits` keeps scale 1."""
    peak: dict[str, float] = {}
    for img in images:
        x = polyphase_pack(np.asarray(img[0], np.float64) * prog.meta["input_scale"])
        _trace(prog, x, peak)
    scale = {name: max(v, 1e-6) * margin for name, v in peak.items()}
    pool_regs = [n for n in scale if (n.startswith("pool0") and n != "pool0.out") or n == "c0"]
    pool_scale = 2.0 * max(scale[n] for n in pool_regs)
    for n in pool_regs:
        scale[n] = pool_scale
    scale["logits"] = 1.0
    # relu outputs: same scale as inputs unless the register is written elsewhere too
    out_ops = []
    for op in prog.ops:
        op = dict(op)
        kind = op["op"]
        if kind == "linear":
            op["vals"] = op["vals"] * scale[op["src"]] / scale[op["dst"]]
            op["bias"] = op["bias"] / scale[op["dst"]]
        elif kind == "relu":
            op["k"] = scale[op["src"]] / scale[op["dst"]]
        elif kind in ("add", "sub"):
            if not (scale[op["a"]] == scale[op["b"]] == scale[op["dst"]]):
                raise ValueError(f"{kind} {op['dst']}: operands need one scale")
        out_ops.append(op)
    meta = {**prog.meta, "x_scale": scale["x"], "scales": scale, "margin": margin,
            "calibration_images": int(len(images))}
    return Program(slots=prog.slots, ops=out_ops, input_size=prog.input_size, n_labels=prog.n_labels,
                   relu_stages=prog.relu_stages, meta=meta)


def _trace(prog: Program, x: np.ndarray, peak: dict[str, float]) -> None:
    """Run the unscaled program with true ReLU, recording each register's largest |value|."""
    regs = {"x": np.zeros(prog.slots)}
    regs["x"][: len(x)] = x
    peak["x"] = max(peak.get("x", 0.0), float(np.abs(x).max()))
    for op in prog.ops:
        kind = op["op"]
        if kind == "linear":
            y = np.bincount(op["rows"], op["vals"] * regs[op["src"]][op["cols"]], minlength=prog.slots)
            y[: len(op["bias"])] += op["bias"]
            if op.get("acc"):
                y += regs[op["dst"]]
        elif kind == "relu":
            y = np.maximum(regs[op["src"]], 0.0)
        elif kind == "add":
            y = regs[op["a"]] + regs[op["b"]]
        else:
            y = regs[op["a"]] - regs[op["b"]]
        regs[op["dst"]] = y
        peak[op["dst"]] = max(peak.get(op["dst"], 0.0), float(np.abs(y).max()))
