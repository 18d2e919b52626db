"""Where the suite keeps caches and reports (repo-local, overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _base(env: str, default: Path) -> Path:
    path = Path(os.environ[env]) if os.environ.get(env) else default
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Trained-model and misc caches (SUITE_CACHE_DIR, default <repo>/.cache)."""
    return _base("SUITE_CACHE_DIR", REPO_ROOT / ".cache")


def dataset_cache_dir() -> Path:
    """Prepared datasets as .npz (SUITE_DATA_CACHE, default <repo>/datasets/cache)."""
    return _base("SUITE_DATA_CACHE", REPO_ROOT / "datasets" / "cache")


def reports_dir() -> Path:
    return _base("SUITE_REPORTS_DIR", REPO_ROOT / "reports")
