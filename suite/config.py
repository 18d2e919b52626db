"""Run configuration: TOML file and CLI flags parsed into validated dataclasses.

Unknown keys are rejected by name (with the nearest valid key), and every value is
checked by type and range with a one-line error naming the key, so a typo or a wrong
type never silently falls back to a default or turns into a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import SuiteError, did_you_mean

# The backends a plain `suite run` runs; `--help` reads them from here.
DEFAULT_BACKENDS = ("plaintext", "null", "mpc", "he", "tee", "dp", "fl")
MIN_RESOLUTION = 32   # the DenseNet downsamples 32x; smaller images fail deep inside torch


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **check: Any):
    """A field with range checks (min, min_exclusive, max_exclusive, choices) in its metadata."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=check)
    return field(default=default, metadata=check)


SPLIT_MODES = ("train-test", "all")


@dataclass
class DatasetConfig:
    name: str = _f("synthetic", nonempty=True)
    data_dir: str | None = None
    label_file: str | None = None
    resolution: int | None = _f(None, min=MIN_RESOLUTION)      # None: the dataset's default
    n_train_per_site: int = _f(300, min=1)                     # synthetic only
    n_test_per_site: int = _f(100, min=0)                      # synthetic only
    test_fraction: float = _f(0.3, min_exclusive=0.0, max_exclusive=1.0)  # real data: patient split
    max_images: int | None = _f(None, min=1)                   # real data: cap for quick looks
    on_bad_image: str = _f("fail", choices=("fail", "skip"))
    views: list[str] | None = None         # real data: view positions kept (None: PA and AP)
    pretrain_dataset: str | None = None    # the vendor's own data, NAME[:DATA_DIR] (suite.data.roles)
    split: str = _f("train-test", choices=SPLIT_MODES)  # "all": validate a finished model on every image


@dataclass
class ModelConfig:
    name: str = _f("small-densenet", nonempty=True)
    epochs: int = _f(8, min=1)
    batch_size: int = _f(64, min=1)
    lr: float = _f(3e-3, min_exclusive=0.0)


@dataclass
class RunConfig:
    backends: list[str] = _f(factory=lambda: list(DEFAULT_BACKENDS), nonempty=True)
    seed: int = _f(0, min=0)
    quick: bool = False
    out: str | None = None
    timeout_s: float = _f(900.0, min_exclusive=0.0)            # per backend configuration
    threads: int = _f(2, min=1)
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


# ---------------------------------------------------------------- checking values

def type_name(value: Any) -> str:
    """How a value reads to a user: TOML/JSON words, not Python class names."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool, int, float, list)) else repr(value)


def check_value(key: str, value: Any, annotation: str, check: dict[str, Any]) -> Any:
    """`value` for the field `key` declared as `annotation`, or a SuiteError naming the key.

    Booleans are never numbers here (TOML `true` for a count is a mistake, not 1), and an
    integer is accepted where a number is expected."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise SuiteError(f"{key} must be set (got nothing)")
    kind = next(k for k in kinds if k != "None")
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind.startswith("list["):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected[kind] = "a list of strings"
    else:
        return value
    if not ok:
        raise SuiteError(f"{key} must be {expected[kind]}, got {type_name(value)} ({shown(value)})")
    check_range(key, value, check)
    return value


def from_text(text: str, base: str) -> Any:
    """A `name:key=value` string as the declared type `base` (ValueError when it is not)."""
    if base == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if base == "int":
        return int(text)
    if base == "float":
        return float(text)
    if base.startswith(("tuple", "list")):
        return tuple(float(v) if _is_number(v) else v for v in text.split("/") if v)
    return text


def has_type(value: Any, base: str) -> bool:
    """Strict type test of a TOML/JSON value against a declared type name."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return number
    if base == "str":
        return isinstance(value, str)
    if base.startswith(("tuple", "list")):
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)
    return True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_range(key: str, value: Any, check: dict[str, Any]) -> None:
    if isinstance(value, float) and math.isnan(value):
        raise SuiteError(f"{key} must be a number, got nan")
    if "min" in check and value < check["min"]:
        raise SuiteError(f"{key} must be at least {check['min']}, got {shown(value)}")
    if "min_exclusive" in check and value <= check["min_exclusive"]:
        raise SuiteError(f"{key} must be greater than {check['min_exclusive']}, got {shown(value)}")
    if "max_exclusive" in check and value >= check["max_exclusive"]:
        raise SuiteError(f"{key} must be less than {check['max_exclusive']}, got {shown(value)}")
    if "choices" in check and value not in check["choices"]:
        raise SuiteError(f"{key} must be one of {', '.join(check['choices'])}, got {shown(value)}")
    if check.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
        raise SuiteError(f"{key} must not be empty")


def _fill(cls, raw: dict[str, Any], where: str):
    """Build dataclass `cls` from `raw`, naming any unknown key (and its nearest match) and
    any value of the wrong type or out of range."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise SuiteError(f"config has no key '{where}{key}'{did_you_mean(key, fields)}")
    values = {}
    for key, value in raw.items():
        f = fields[key]
        if key == "backends" and isinstance(value, str):   # "a,b" reads as ["a", "b"]
            value = [b.strip() for b in value.split(",") if b.strip()]
        values[key] = check_value(f"{where}{key}", value, str(f.type), dict(f.metadata))
    return cls(**values)


def load_config(path: str | Path | None) -> RunConfig:
    """Read a TOML config ([run], [dataset], [model], [backends.NAME]) or return defaults."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SuiteError(f"config file {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError:
        raise SuiteError(f"config file {path} is not a text (TOML) file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"config file {path} is not valid TOML: {exc}") from None
    sections = {"run", "dataset", "model", "backends"}
    for key, value in raw.items():
        if key not in sections:
            raise SuiteError(f"config has no section '[{key}]'{did_you_mean(key, sections)}")
        if not isinstance(value, dict):
            raise SuiteError(f"config: '{key}' must be a section ([{key}]), got {type_name(value)}")
    run = dict(raw.get("run", {}))
    if "backend_options" in run or "dataset" in run or "model" in run:
        raise SuiteError("config: put dataset, model and backend options in their own sections")
    cfg = _fill(RunConfig, run, "run.")
    cfg.dataset = _fill(DatasetConfig, dict(raw.get("dataset", {})), "dataset.")
    cfg.model = _fill(ModelConfig, dict(raw.get("model", {})), "model.")
    backends = raw.get("backends", {})
    for name, table in backends.items():
        if not isinstance(table, dict):
            raise SuiteError(f"config: [backends] must hold one table per backend, e.g. [backends.mpc]; "
                             f"'backends.{name}' is {type_name(table)}")
    cfg.backend_options = {k: dict(v) for k, v in backends.items()}
    return cfg


@dataclass(frozen=True)
class BackendSpec:
    """One backend configuration as the user wrote it: `name` plus `key=value` options."""

    name: str
    options: tuple[tuple[str, str], ...] = ()
    # a composition `train>serve` (e.g. `dp:target_epsilon=3>mpc`): this spec trains and
    # releases a model, `served_by` serves that model; the planner makes it one row
    served_by: "BackendSpec | None" = None

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        """'mpc:engine=spu:protocol=cheetah' -> BackendSpec('mpc', (('engine','spu'), ...));
        'dp:target_epsilon=3>mpc' -> BackendSpec('dp', ..., served_by=BackendSpec('mpc'))."""
        if ">" in text:
            left, _, right = text.partition(">")
            if ">" in right or not left.strip() or not right.strip():
                raise SuiteError(f"composition '{text}' must look like TRAINING>INFERENCE, "
                                 f"e.g. dp:target_epsilon=3>mpc")
            trained = cls.parse(left)
            return cls(trained.name, trained.options, served_by=cls.parse(right))
        name, *parts = [p.strip() for p in text.strip().split(":")]
        if not name:
            raise SuiteError(f"empty backend name in '{text}'")
        opts = []
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise SuiteError(f"backend option '{part}' in '{text}' must look like key=value")
            if key in dict(opts):
                raise SuiteError(f"backend option '{key}' is given twice in '{text}'")
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
        raise SuiteError("no backends given: name at least one, e.g. --backends plaintext,null")
    return specs


def duplicate_specs(items: list[str] | str) -> list[str]:
    """Backend entries the user wrote more than once (they run once; the caller notes it)."""
    seen, dups = set(), []
    for spec in parse_backend_list(items):
        if spec in seen and spec not in dups:
            dups.append(spec)
        seen.add(spec)
    return [s.name + "".join(f":{k}={v}" for k, v in s.options) for s in dups]


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved in run.json (for --resume)."""
    if not isinstance(d, dict):
        raise SuiteError("run.json: 'config' must be a table")
    d = dict(d)
    cfg = _fill(RunConfig, {k: v for k, v in d.items()
                            if k not in ("dataset", "model", "backend_options")}, "run.")
    cfg.dataset = _fill(DatasetConfig, dict(d.get("dataset") or {}), "dataset.")
    cfg.model = _fill(ModelConfig, dict(d.get("model") or {}), "model.")
    options = d.get("backend_options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise SuiteError("run.json: 'config.backend_options' must hold one table per backend")
    cfg.backend_options = {k: dict(v) for k, v in options.items()}
    return cfg


def config_differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """'key: wanted (saved run: saved)' for every setting that changes results."""
    a, b = _flat(saved.as_dict()), _flat(wanted.as_dict())
    out = []
    for key in sorted(set(a) | set(b)):
        if key == "out":
            continue
        va, vb = a.get(key), b.get(key)
        if key == "backends":
            va, vb = sorted(set(va or [])), sorted(set(vb or []))
        if va != vb:
            out.append(f"{key} {shown(b.get(key))} (saved run: {shown(a.get(key))})")
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("dataset", "model"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out
