"""Installed library versions, looked up one way everywhere (run.json, backends' rows)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def library_versions(*distributions: str) -> dict[str, str]:
    """{distribution: version}; a missing one says so instead of failing the run."""
    out = {}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
