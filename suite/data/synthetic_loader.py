"""Catalog adapter for the embedded synthetic multi-site phantoms."""

from __future__ import annotations

import hashlib
from pathlib import Path

from suite.config import DatasetConfig
from suite.data.imageset import ImageSet

# The generator's own source is part of the cache key: editing it invalidates cached sets.
LOADER_VERSION = hashlib.sha256((Path(__file__).parent / "synthetic.py").read_bytes()).hexdigest()[:12]


def load(cfg: DatasetConfig, seed: int, quick: bool = False) -> ImageSet:
    from suite.data.synthetic import generate_synthetic

    n_train, n_test = cfg.n_train_per_site, cfg.n_test_per_site
    if quick:
        n_train, n_test = min(n_train, 120), min(n_test, 40)
    return generate_synthetic(n_train_per_site=n_train, n_test_per_site=n_test,
                              size=cfg.resolution or 64, seed=seed)
