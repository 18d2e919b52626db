"""Run configuration: TOML file and CLI flags parsed into validated dataclasses.

Unknown keys are rejected by name (with the nearest valid key), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import SuiteError, did_you_mean

DEFAULT_BACKENDS = ("plaintext", "null", "mpc", "he", "tee", "dp", "fl")


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    data_dir: str | None = None
    label_file: str | None = None
    resolution: int | None = None          # None: the dataset's default
    n_train_per_site: int = 300            # synthetic only
    n_test_per_site: int = 100             # synthetic only
    test_fraction: float = 0.3             # real data: patient-level split
    max_images: int | None = None          # real data: cap for quick looks
    on_bad_image: str = "fail"             # fail | skip
    views: list[str] | None = None         # real data: view positions kept (None: PA and AP)
    pretrain_dataset: str | None = None    # the vendor's own data, NAME[:DATA_DIR] (suite.data.roles)


@dataclass
class ModelConfig:
    name: str = "small-densenet"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3


@dataclass
class RunConfig:
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    seed: int = 0
    quick: bool = False
    out: str | None = None
    timeout_s: float = 900.0               # per backend configuration
    threads: int = 2
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def hash(self) -> str:
        """Stable hash of everything that changes results (not where they are written)."""
        d = dataclasses.asdict(self)
        d.pop("out", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fill(cls, raw: dict[str, Any], where: str):
    """Build dataclass `cls` from `raw`, naming any unknown key and its nearest match."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise SuiteError(f"config has no key '{where}{key}'{did_you_mean(key, known)}")
    return cls(**raw)


def load_config(path: str | Path | None) -> RunConfig:
    """Read a TOML config ([run], [dataset], [model], [backends.NAME]) or return defaults."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"config file {path} is not valid TOML: {exc}") from None
    sections = {"run", "dataset", "model", "backends"}
    for key in raw:
        if key not in sections:
            raise SuiteError(f"config has no section '[{key}]'{did_you_mean(key, sections)}")
    run = dict(raw.get("run", {}))
    if "backend_options" in run or "dataset" in run or "model" in run:
        raise SuiteError("config: put dataset, model and backend options in their own sections")
    cfg = _fill(RunConfig, run, "run.")
    cfg.dataset = _fill(DatasetConfig, dict(raw.get("dataset", {})), "dataset.")
    cfg.model = _fill(ModelConfig, dict(raw.get("model", {})), "model.")
    backends = raw.get("backends", {})
    if not all(isinstance(v, dict) for v in backends.values()):
        raise SuiteError("config: [backends] must hold one table per backend, e.g. [backends.mpc]")
    cfg.backend_options = {k: dict(v) for k, v in backends.items()}
    if isinstance(cfg.backends, str):
        cfg.backends = [b for b in cfg.backends.split(",") if b]
    return cfg


@dataclass(frozen=True)
class BackendSpec:
    """One backend configuration as the user wrote it: `name` plus `key=value` options."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        """'mpc:engine=spu:protocol=cheetah' -> BackendSpec('mpc', (('engine','spu'), ...))."""
        name, *parts = [p.strip() for p in text.strip().split(":")]
        if not name:
            raise SuiteError(f"empty backend name in '{text}'")
        opts = []
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise SuiteError(f"backend option '{part}' in '{text}' must look like key=value")
            opts.append((key, value))
        return cls(name, tuple(opts))

    def merged_options(self, config_options: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Config-file defaults for this backend, overridden by the spec's own options."""
        return {**config_options.get(self.name, {}), **dict(self.options)}


def parse_backend_list(items: list[str] | str) -> list[BackendSpec]:
    if isinstance(items, str):
        items = items.split(",")
    specs = [BackendSpec.parse(t) for t in items if t.strip()]
    if not specs:
        raise SuiteError("no backends given")
    return specs


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved in run.json (for --resume)."""
    d = dict(d)
    cfg = _fill(RunConfig, {k: v for k, v in d.items() if k not in ("dataset", "model")}, "run.")
    cfg.dataset = _fill(DatasetConfig, d.get("dataset", {}), "dataset.")
    cfg.model = _fill(ModelConfig, d.get("model", {}), "model.")
    return cfg
