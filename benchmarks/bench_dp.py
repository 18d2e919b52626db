"""DP-SGD step time against a non-private step on the same batch (asv style).

The model is the suite's full small DenseNet (growth 12, blocks 2-2-2-2) made Opacus-compatible
(BatchNorm -> GroupNorm, out-of-place ReLU), 64 px images, batch 64, Adam, the dp backend's
loss. One DP step = per-sample gradients + flat clipping + Gaussian noise + Adam; one
non-private step = ordinary backward + Adam on the same GroupNorm model (and, for reference,
on the original BatchNorm model the plaintext recipe trains). Per-sample gradient modes of
Opacus 1.6: hooks (default), functorch, ew (torch ExpandedWeights), ghost (fast gradient
clipping: per-sample norms without storing per-sample gradients, for Linear layers; conv
layers still materialise theirs, and it takes a second backward pass). ew computes per-sample
gradients instead of, not on top of, the batch weight gradient, so it is the fastest on the
DenseNet; it used to fail on batches under 32 images (DenseNet's concatenations hand convs
strided gradients that torch's small-batch grouped-conv path cannot view), which
`make_opacus_compatible` now fixes with a contiguous-gradient hook per conv, and empty Poisson
batches take a noise-only step. The dp backend uses ew for scope=full and, for the head,
`linear`: per-sample clipping of a linear layer in closed form (backends.dp.linear_head; the
ghost-norm identity without Opacus' second backward pass and per-step bookkeeping).

Measured under load (shared 2-core machine, ~7 other jobs), 1 thread, process CPU time,
median of 5 paired steps, 2026-12-01: full DenseNet ew 1.74-1.75x, hooks 2.00-2.02x the
non-private step; secure mode 0.86-0.93x (within noise: its urandom noise is small next to
the step). Head (batch 256): hooks 1.83-2.72x, ew 2.32x, ghost 2.47-2.83x (a 1.5-2 ms
non-private step, so Opacus' fixed per-step work dominates); secure mode 1.03-1.19x.
Head with `linear` (the default since 2026-12-01), measured under heavy load (load average
~25 on 2 cores), 1 thread, median of 41 paired steps: 1.18x the non-private step in process
CPU time (1.02x wall-clock), against hooks 1.96x, ew 1.77x, ghost 2.56x in the same session;
secure mode 1.20x seeded (its urandom noise is a larger share of a 1 ms step).

    asv run --bench bench_dp                   # under asv
    .venv/bin/python benchmarks/bench_dp.py     # standalone: prints the ratios

`HeadDPStepTime` times what the default `dp` rows train (scope=head): the linear head on the
frozen vendor backbone's features, batch 256, where Opacus' ghost clipping applies (Linear).
`track_secure_over_seeded` is the cost of secure mode: the same DP step with CSPRNG sampling
and noise (os.urandom, four Box-Muller normals per coordinate) over torch's seeded PRNG.

`track_dp_over_nonprivate` interleaves DP and non-private steps and returns the median of
per-pair ratios, which survives a noisy shared machine better than two separate timings. On a
machine shared with other jobs, wall-clock ratios at 2 threads swing wildly (OpenMP threads
wait on each other); `track_dp_over_nonprivate_cpu` therefore also reports the ratio of
process CPU time at 1 thread, which other processes barely disturb.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

MODES = ["hooks", "functorch", "ew", "ghost"]
BATCH, SIZE, LABELS = 64, 64, 5


def _build(mode: str, batch: int = BATCH, size: int = SIZE, secure: bool = False):
    import torch

    from backends.dp.training import (DenseNetLogits, PerSampleMaskedBCE, TrainConfig,
                                      make_opacus_compatible, prepare)
    from suite.models import SMALL_DENSENET, build_densenet

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen) * 300
    y = (torch.rand(batch, LABELS, generator=gen) < 0.2).float()
    original = build_densenet(SMALL_DENSENET, LABELS)
    fixed = make_opacus_compatible(copy.deepcopy(original))
    # the non-private step gets the same GroupNorm model without the gradient-copy hooks
    plain_fixed = make_opacus_compatible(copy.deepcopy(original), contiguous_conv_grads=False)
    loss = PerSampleMaskedBCE("mean")

    def plain_step_fn(module):
        module.train()
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss(module(x), y).backward()
            opt.step()
        return step

    nonprivate = plain_step_fn(DenseNetLogits(plain_fixed))
    batchnorm = plain_step_fn(DenseNetLogits(copy.deepcopy(original)))
    # DP: Opacus' wrapped model and DPOptimizer from the dp backend's own `prepare`
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, privacy="dp", noise_multiplier=1.0,
                      max_grad_norm=1.0, grad_sample_mode=mode, secure=secure)
    run = prepare(DenseNetLogits(copy.deepcopy(fixed)), x, y, cfg)
    if run.expected_batch_size != batch:
        raise RuntimeError("benchmark batch must be the whole toy dataset")

    def dp_step():
        run.optimizer.zero_grad()
        run.loss_fn(run.model(x), y).backward()
        run.optimizer.step()
    return nonprivate, batchnorm, dp_step, run


class DPStepTime:
    params = (MODES,)
    param_names = ["grad_sample_mode"]
    timeout = 600
    number = 1
    repeat = 5
    warmup_time = 0

    def setup(self, mode):
        import torch

        torch.set_num_threads(2)
        warnings.filterwarnings("ignore")
        self.nonprivate, self.batchnorm, self.dp, self.run = _build(mode)
        self.nonprivate(), self.dp(), self.batchnorm()   # warm-up

    def teardown(self, mode):
        self.run.close()

    def time_nonprivate_step(self, mode):
        self.nonprivate()

    def time_dp_step(self, mode):
        self.dp()

    def track_dp_over_nonprivate(self, mode):
        return _paired_ratio(self.dp, self.nonprivate, pairs=7)

    track_dp_over_nonprivate.unit = "ratio"

    def track_dp_over_batchnorm_nonprivate(self, mode):
        return _paired_ratio(self.dp, self.batchnorm, pairs=7)

    track_dp_over_batchnorm_nonprivate.unit = "ratio"

    def track_secure_over_seeded(self, mode):
        _, _, secure_dp, run = _build(mode, secure=True)
        try:
            secure_dp()
            return _paired_ratio(secure_dp, self.dp, pairs=7)
        finally:
            run.close()

    track_secure_over_seeded.unit = "ratio"

    def track_dp_over_nonprivate_cpu(self, mode):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _paired_ratio(self.dp, self.nonprivate, pairs=5, clock=time.process_time)
        finally:
            torch.set_num_threads(before)

    track_dp_over_nonprivate_cpu.unit = "ratio"


HEAD_MODES = ["linear", "hooks", "ew", "ghost"]
HEAD_BATCH, HEAD_ROWS = 256, 1680


def _build_head(mode: str, secure: bool = False):
    """The default dp rows' training step: the vendor head on frozen backbone features."""
    import torch

    from backends.dp.training import TrainConfig, prepare
    from suite.models import SMALL_DENSENET, build_densenet

    d = build_densenet(SMALL_DENSENET, LABELS).classifier.in_features
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(HEAD_ROWS, d, generator=gen)
    y = (torch.rand(HEAD_ROWS, LABELS, generator=gen) < 0.2).float()
    xb, yb = x[:HEAD_BATCH], y[:HEAD_BATCH]
    torch.manual_seed(0)
    plain = torch.nn.Linear(d, LABELS)
    plain_run = prepare(plain, x, y, TrainConfig(epochs=1, batch_size=HEAD_BATCH, lr=0.05, privacy="none"))
    torch.manual_seed(0)
    dp_run = prepare(torch.nn.Linear(d, LABELS), x, y,
                     TrainConfig(epochs=1, batch_size=HEAD_BATCH, lr=0.05, privacy="dp",
                                 noise_multiplier=1.0, grad_sample_mode=mode, secure=secure))

    def step_of(run):
        def step():
            run.step(xb, yb)
        return step
    return step_of(plain_run), step_of(dp_run), dp_run


class HeadDPStepTime:
    params = (HEAD_MODES,)
    param_names = ["grad_sample_mode"]
    timeout = 300
    number = 5
    repeat = 5
    warmup_time = 0

    def setup(self, mode):
        import torch

        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        self.nonprivate, self.dp, self.run = _build_head(mode)
        _, self.secure_dp, self.secure_run = _build_head(mode, secure=True)
        self.nonprivate(), self.dp(), self.secure_dp()

    def teardown(self, mode):
        self.run.close()
        self.secure_run.close()

    def time_head_dp_step(self, mode):
        self.dp()

    def time_head_nonprivate_step(self, mode):
        self.nonprivate()

    def track_head_dp_over_nonprivate(self, mode):
        return _paired_ratio(self.dp, self.nonprivate, pairs=21)

    track_head_dp_over_nonprivate.unit = "ratio"

    def track_head_secure_over_seeded(self, mode):
        return _paired_ratio(self.secure_dp, self.dp, pairs=21)

    track_head_secure_over_seeded.unit = "ratio"


def _clock(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def _paired_ratio(a, b, pairs: int, clock=time.perf_counter) -> float:
    """Median over pairs of time(a) / time(b), alternating which runs first."""
    ratios = []
    for i in range(pairs):
        if i % 2:
            tb, ta = _clock(b, clock), _clock(a, clock)
        else:
            ta, tb = _clock(a, clock), _clock(b, clock)
        ratios.append(ta / tb)
    return statistics.median(ratios)


def main(modes=MODES, pairs: int = 5) -> None:
    """Per mode: CPU-time ratio at 1 thread (robust) and wall-clock ratio at 2 threads."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"head (default dp rows): Linear on backbone features, batch {HEAD_BATCH}, 1 thread, "
          f"median of {4 * pairs + 1} paired steps (process CPU time)")
    for mode in HEAD_MODES:
        nonprivate, dp, run = _build_head(mode)
        _, secure_dp, secure_run = _build_head(mode, secure=True)
        nonprivate(), dp(), secure_dp()
        ratio = _paired_ratio(dp, nonprivate, 4 * pairs + 1, time.process_time)
        secure = _paired_ratio(secure_dp, dp, 4 * pairs + 1, time.process_time)
        step = min(_clock(dp, time.process_time) for _ in range(5))
        run.close(), secure_run.close()
        print(f"{mode:>9}: DP {step * 1e3:6.2f} ms = {ratio:.2f}x non-private | secure mode "
              f"{secure:.2f}x seeded", flush=True)
    print(f"small DenseNet (GroupNorm), batch {BATCH}, {SIZE} px; median of {pairs} paired steps")
    for mode in modes:
        nonprivate, batchnorm, dp, run = _build(mode)
        torch.set_num_threads(1)
        nonprivate(), dp()
        cpu_np = min(_clock(nonprivate, time.process_time) for _ in range(2))
        cpu_dp = min(_clock(dp, time.process_time) for _ in range(2))
        cpu_ratio = _paired_ratio(dp, nonprivate, pairs, time.process_time)
        torch.set_num_threads(2)
        wall_ratio = _paired_ratio(dp, nonprivate, pairs)
        wall_bn = _paired_ratio(dp, batchnorm, pairs)
        _, _, secure_dp, secure_run = _build(mode, secure=True)
        secure_dp()
        secure = _paired_ratio(secure_dp, dp, pairs, time.process_time)
        run.close(), secure_run.close()
        print(f"{mode:>9}: 1 thread CPU: DP {cpu_dp * 1e3:6.0f} ms / non-private {cpu_np * 1e3:5.0f} ms"
              f" = {cpu_ratio:.2f}x | 2 threads wall: {wall_ratio:.2f}x "
              f"(vs BatchNorm original {wall_bn:.2f}x) | secure mode {secure:.2f}x seeded", flush=True)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else MODES)
