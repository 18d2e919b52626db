"""The interface every privacy technique implements.

Backends compute; they never time themselves. The harness calls `setup`, optionally
`fit`, then `predict_proba` batch by batch, then `teardown`, and measures around
each call. Traffic between parties goes through the `CommMeter` in the context.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from suite.errors import SuiteError, did_you_mean
from suite.meter import CommMeter
from suite.threat_model import ThreatModel

TRACKS = ("reference", "inference", "training")


@dataclass
class BackendContext:
    """What the harness gives a backend: the model, where to write, and the meter."""

    model: Any                      # suite.models.ModelBundle (torch module + metadata)
    meter: CommMeter
    workdir: Path                   # private scratch folder for this backend run
    seed: int = 0
    threads: int = 2
    quick: bool = False
    cache_dir: Path | None = None
    released_model_path: Path | None = None   # where the harness saves released_model()
    progress_path: Path | None = None         # where the harness reports images done


@dataclass(frozen=True)
class BatchMeta:
    """Who the images of one batch are: the harness passes it with every predict call, so a
    backend never has to reach into the run folder to learn an image's site."""

    image_ids: tuple[str, ...]
    sites: tuple[str, ...]


@dataclass
class BackendOptions:
    """Base for per-backend option dataclasses; unknown keys are rejected by name."""

    @classmethod
    def parse(cls, raw: dict[str, Any], backend: str) -> "BackendOptions":
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise SuiteError(
                    f"backend '{backend}' has no option '{key}'{did_you_mean(key, known)}; "
                    f"options: {', '.join(sorted(known)) or '(none)'}"
                )
        values = {}
        for key, value in raw.items():
            values[key] = _coerce(value, known[key], backend)
        return cls(**values)


def _coerce(value: Any, f: dataclasses.Field, backend: str) -> Any:
    """Turn CLI strings ('8', 'true') into the option's declared type; check TOML/JSON values
    by type (a boolean is never a number) and range (no negative count, size or time; a field
    may narrow the range with `metadata`, e.g. field(default=1, metadata={"min": 1}))."""
    from suite.config import check_range, from_text, has_type, shown, type_name

    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kinds = [k.strip() for k in kind.split("|")]
    base = next((k for k in kinds if k != "None"), "str")
    where = f"backend '{backend}' option '{f.name}'"
    words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
    expects = words.get(base.split("[")[0], "a list of values separated by /")
    if value is None or (isinstance(value, str) and "None" in kinds and value.lower() in ("", "none")):
        if "None" in kinds:
            return None
        raise SuiteError(f"{where} expects {expects}, got nothing")
    if isinstance(value, str):
        try:
            value = from_text(value, base)
        except ValueError:
            raise SuiteError(f"{where} expects {expects}, got '{value}'") from None
    elif not has_type(value, base):
        raise SuiteError(f"{where} expects {expects}, got {type_name(value)} ({shown(value)})")
    if base.startswith(("tuple", "list")):
        value = tuple(value)
    for item in (value if isinstance(value, tuple) else (value,)):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            check_range(where, item, {"min": 0, **dict(f.metadata)})
        elif f.metadata and not isinstance(item, bool):
            check_range(where, item, dict(f.metadata))
    return float(value) if base == "float" else value


class Backend(ABC):
    """A privacy technique. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    track: ClassVar[str]                       # one of TRACKS
    extra: ClassVar[str | None] = None         # pip extra that installs its library
    requires: ClassVar[tuple[str, ...]] = ()   # importable modules it needs (checked by `list`)
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    # Largest |p_backend - p_plaintext| the backend promises on inference; None when the
    # backend is not meant to reproduce plaintext outputs (training track, null).
    tolerance: ClassVar[float | None] = None
    # Options the shared conformance test uses to keep this backend tiny and fast.
    test_options: ClassVar[dict[str, Any]] = {}
    # Option overlays (on top of test_options) that reach every engine and mode of this entry:
    # the conformance battery runs each, and every configuration its expand() yields.
    conformance_variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # The backend's own metrics (name -> MetricSpec). When declared, every extra or audit row
    # must use one of these names (suite.extra_rows checks it) and inherits unit and direction.
    extra_metrics: ClassVar[dict[str, Any]] = {}
    # Images per predict call the harness uses unless the options say otherwise.
    default_batch_size: ClassVar[int] = 32

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def threat_model(self) -> ThreatModel:
        """The declared protection of this configuration."""

    @abstractmethod
    def setup(self, ctx: BackendContext) -> None:
        """One-off work (key generation, sharing weights, starting parties)."""

    def prepare_fit(self, train: "Any", ctx: BackendContext) -> None:
        """Training track, optional: data-dependent one-off work that is not training (e.g.
        a frozen backbone's features, possibly from a cache). The harness times it as part
        of setup, so fit_time is the training alone."""

    def fit(self, train: "Any", ctx: BackendContext) -> None:
        """Training-track backends train here on `train` (a suite.data.ImageSet)."""
        raise NotImplementedError(f"{self.name} has no training step")

    @abstractmethod
    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        """Probabilities [B, L] in [0, 1] for images [B, 1, H, W] (float32, xrv range).
        `meta` names the images (ids, sites); the harness always passes it."""

    def audit(self, ctx: BackendContext, train: Any, test: Any) -> list[dict]:
        """Privacy audits of what this configuration released (membership inference,
        gradient inversion), as partial result rows like `extra_rows`. The harness runs this
        as its own timed phase after prediction and before teardown; a raised exception is
        recorded as a failed audit, never swallowed. `train` is None on the inference track."""
        return []

    def fit_scope(self) -> str:
        """Training track: what the timed fit phase holds besides training itself (an
        engine's start-up, say), so the `fit_time_ratio` row's note says what it compares;
        "" when fit is training alone."""
        return ""

    def released_model(self) -> Any:
        """Training track: the model this configuration releases (a suite.models.ModelBundle),
        which a composition (`dp>mpc`) serves through another technique; None if it releases
        none. The harness saves it after fit, before teardown."""
        return None

    def teardown(self) -> None:
        """Release processes, files and keys. Must be safe to call after a failed setup."""

    def versions(self) -> dict[str, str]:
        """Library versions that determine this backend's numbers."""
        return {}

    def batch_size(self) -> int:
        return int(getattr(self.options, "batch_size", 0) or self.default_batch_size)

    def max_images(self) -> int | None:
        """Upper bound on test images for slow backends (a stratified subset); None = all."""
        value = getattr(self.options, "max_images", None)
        return int(value) if value else None

    @classmethod
    def implementation(cls, options: BackendOptions) -> type["Backend"]:
        """The class that runs these options. One registered name may stand for several
        implementations (he: mode=head|cnn; mpc: engine=crypten|spu); the worker rebuilds a
        configuration from (name, options), so the choice must follow from the options alone."""
        return cls

    @classmethod
    def create(cls, options: BackendOptions) -> "Backend":
        """Build the configuration `options` describe (use this, not the constructor)."""
        return cls.implementation(options)(options)

    @classmethod
    def expand(cls, options: BackendOptions) -> list["Backend"]:
        """Configurations this entry stands for (a sweep yields several rows)."""
        return [cls.create(options)]

    def reference(self) -> "Backend | str | None":
        """What this configuration is compared with: 'plaintext' for inference, a control
        configuration (another Backend) for training, None for the reference itself."""
        return "plaintext" if self.track == "inference" else None

    def extra_rows(self) -> list[dict]:
        """Backend-specific measured or projected figures as partial result rows.

        Each dict has at least `metric` and `value` (and `unit`, `higher_is_better` unless the
        metric is declared in `extra_metrics`). Conditions are typed columns, never parts of
        the name: `party`, `phase`, `network` (lan | wan), `estimate` (measured | projected |
        simulated), `round`; see suite.extra_rows.
        """
        return []

    def config_label(self) -> str:
        """How this configuration is named on the leaderboard, e.g. 'mpc' or 'he[mode=cnn]'."""
        defaults = self.Options()
        changed = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != getattr(defaults, f.name)
        }
        if not changed:
            return self.name
        return f"{self.name}[" + ",".join(f"{k}={format_option(v)}" for k, v in sorted(changed.items())) + "]"


def format_option(value: Any) -> str:
    """An option value as it appears in a configuration name (tuples joined by /)."""
    if isinstance(value, (tuple, list)):
        return "/".join(format_option(v) for v in value)
    return str(value)
