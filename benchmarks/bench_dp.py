"""DP-SGD step time against a non-private step on the same batch (asv style).

The model is the suite's full small DenseNet (growth 12, blocks 2-2-2-2) made Opacus-compatible
(BatchNorm -> GroupNorm, out-of-place ReLU), 64 px images, batch 64, Adam, the dp backend's
loss. One DP step = per-sample gradients + flat clipping + Gaussian noise + Adam; one
non-private step = ordinary backward + Adam on the same GroupNorm model (and, for reference,
on the original BatchNorm model the plaintext recipe trains). Per-sample gradient modes of
Opacus 1.6: hooks (default), functorch, ew (torch ExpandedWeights), ghost (fast gradient
clipping: per-sample norms without storing per-sample gradients, for Linear layers; conv
layers still materialise theirs). ew is the fastest here but fails on batches under 32
images with this DenseNet (torch's ExpandedWeights grouped-conv path), so the dp backend
defaults to hooks.

    asv run --bench bench_dp                   # under asv
    .venv/bin/python benchmarks/bench_dp.py     # standalone: prints the ratios

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


def _build(mode: str, batch: int = BATCH, size: int = SIZE):
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
    loss = PerSampleMaskedBCE("mean")

    def plain_step_fn(module):
        module.train()
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss(module(x), y).backward()
            opt.step()
        return step

    nonprivate = plain_step_fn(DenseNetLogits(copy.deepcopy(fixed)))
    batchnorm = plain_step_fn(DenseNetLogits(copy.deepcopy(original)))
    # DP: Opacus' wrapped model and DPOptimizer from the dp backend's own `prepare`
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, privacy="dp", noise_multiplier=1.0,
                      max_grad_norm=1.0, grad_sample_mode=mode)
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

    def track_dp_over_nonprivate_cpu(self, mode):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _paired_ratio(self.dp, self.nonprivate, pairs=5, clock=time.process_time)
        finally:
            torch.set_num_threads(before)

    track_dp_over_nonprivate_cpu.unit = "ratio"


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
        run.close()
        print(f"{mode:>9}: 1 thread CPU: DP {cpu_dp * 1e3:6.0f} ms / non-private {cpu_np * 1e3:5.0f} ms"
              f" = {cpu_ratio:.2f}x | 2 threads wall: {wall_ratio:.2f}x "
              f"(vs BatchNorm original {wall_bn:.2f}x)", flush=True)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else MODES)
