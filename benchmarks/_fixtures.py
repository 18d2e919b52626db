"""Small shared builders for benchmarks: data and models built the way the suite builds them."""

from __future__ import annotations

import numpy as np


def synthetic(n_per_site: int = 8, size: int = 64, seed: int = 0):
    from suite.data.synthetic import generate_synthetic

    return generate_synthetic(n_train_per_site=n_per_site, n_test_per_site=n_per_site, size=size, seed=seed)


def small_model(labels, size: int = 64):
    from suite.models import random_small_densenet

    return random_small_densenet(labels, resolution=size, seed=0)


def context(model, workdir):
    from pathlib import Path

    from suite.backend import BackendContext
    from suite.meter import CommMeter

    Path(workdir).mkdir(parents=True, exist_ok=True)
    return BackendContext(model=model, meter=CommMeter(), workdir=Path(workdir), threads=2)


def batch(data, n: int) -> np.ndarray:
    return data.images[:n]
