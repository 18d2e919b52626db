"""Latency and throughput from the harness's per-batch timings.

Per-image latency is batch time / batch size per batch, so batches of different sizes
(the last one is often short) are comparable; throughput is pooled over all batches.
"""

from __future__ import annotations

import numpy as np


def latency_summary(batch_seconds: list[float], batch_sizes: list[int]) -> dict[str, float]:
    """Percentiles (numpy's linear interpolation) of per-image and per-batch latency,
    throughput (images / total seconds) and online_time (total seconds of predict calls)."""
    secs = np.asarray(batch_seconds, dtype=float)
    sizes = np.asarray(batch_sizes, dtype=float)
    if secs.ndim != 1 or sizes.ndim != 1 or secs.size != sizes.size:
        raise ValueError(f"need one size per batch: {secs.size} times, {sizes.size} sizes")
    if secs.size == 0:
        raise ValueError("no batches were timed")
    if not np.isfinite(secs).all() or (secs < 0).any():
        raise ValueError("batch times must be finite and non-negative")
    if (sizes <= 0).any():
        raise ValueError("batch sizes must be positive")
    per_image = secs / sizes
    total = float(secs.sum())
    return {
        "latency_per_image_p50": float(np.percentile(per_image, 50)),
        "latency_per_image_p95": float(np.percentile(per_image, 95)),
        "latency_per_batch_p50": float(np.percentile(secs, 50)),
        "latency_per_batch_p95": float(np.percentile(secs, 95)),
        "throughput": float(sizes.sum()) / total if total > 0 else float("inf"),
        "online_time": total,
    }
