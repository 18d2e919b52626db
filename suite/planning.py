"""Expand the user's backend list into concrete configurations, references first.

Each configuration is one leaderboard row. Inference backends are compared with
`plaintext`; training-track backends name their own control (e.g. the non-private
model trained with the same recipe), which is scheduled before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from suite.backend import Backend
from suite.config import RunConfig, parse_backend_list
from suite.errors import SuiteError, BackendUnavailable
from suite.registry_backends import BACKENDS


@dataclass
class Planned:
    backend_id: str
    name: str
    track: str
    options: dict[str, Any]          # JSON-able options, as the worker re-parses them
    reference: str | None            # backend_id compared against
    max_images: int | None
    instance: Backend | None = None
    unavailable: str | None = None   # why it cannot run here
    requested: int = 0               # entries of the user's list that yield it (>1: merged)
    model_from: str | None = None    # composition: the training configuration whose released
                                     # model this inference configuration serves
    trained_by: Backend | None = None

    def threat_model(self):
        """The configuration's own, or for a composition both guarantees, each for its asset."""
        if self.instance is None:
            return None
        if self.trained_by is None:
            return self.instance.threat_model()
        from suite.threat_model import compose

        return compose(self.trained_by.threat_model(), self.instance.threat_model(),
                       self.model_from, self.instance.config_label())


def options_dict(backend: Backend) -> dict[str, Any]:
    import dataclasses

    return {f.name: _jsonable(getattr(backend.options, f.name)) for f in dataclasses.fields(backend.options)}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def plan_backends(cfg: RunConfig) -> list[Planned]:
    specs = parse_backend_list(cfg.backends)
    for spec in specs:
        BACKENDS.target(spec.name)  # unknown name -> one-line error with a suggestion
        if spec.served_by is not None:
            BACKENDS.target(spec.served_by.name)
    plans: dict[str, Planned] = {}

    def add(backend: Backend, by_user: bool = False) -> str:
        ref = backend.reference()
        ref_id = None
        if isinstance(ref, Backend):
            ref_id = add(ref)
        elif isinstance(ref, str):
            ref_id = ref if ref in plans else add(_instantiate(ref, {}, cfg))
        bid = backend.config_label()
        if bid not in plans:
            plans[bid] = Planned(bid, backend.name, backend.track, options_dict(backend), ref_id,
                                 backend.max_images(), backend)
        plans[bid].requested += by_user
        return bid

    def compose_rows(spec) -> None:
        """`train>serve`: the first configuration the training entry yields (e.g. dp at the
        epsilon named), then the inference entry serving its released model, compared with
        that model in plaintext (the training row's own predictions)."""
        trainer_cls = BACKENDS.load(spec.name)
        trainer = trainer_cls.expand(trainer_cls.Options.parse(spec.merged_options(cfg.backend_options),
                                                               spec.name))[0]
        served = spec.served_by
        server = _instantiate(served.name, dict(served.options), cfg)
        if trainer.track != "training":
            raise SuiteError(f"composition {spec.name}>{served.name}: '{spec.name}' trains no model "
                             f"(track {trainer.track}); the left side must be a training backend")
        if server.track != "inference":
            raise SuiteError(f"composition {spec.name}>{served.name}: '{served.name}' does not serve a "
                             f"model (track {server.track}); the right side must be an inference backend")
        trainer_id = add(trainer, by_user=True)
        bid = f"{trainer_id}>{server.config_label()}"
        if bid not in plans:
            plans[bid] = Planned(bid, server.name, server.track, options_dict(server), trainer_id,
                                 server.max_images(), server, model_from=trainer_id, trained_by=trainer)
        plans[bid].requested += 1

    add(_instantiate("plaintext", {}, cfg))
    for spec in specs:
        if spec.served_by is not None:
            compose_rows(spec)
            continue
        raw = spec.merged_options(cfg.backend_options)
        try:
            cls = BACKENDS.load(spec.name)
        except BackendUnavailable as exc:
            plans.setdefault(spec.name, Planned(spec.name, spec.name, "unknown", raw, None, None,
                                                unavailable=str(exc)))
            plans[spec.name].requested += 1
            continue
        for backend in {b.config_label(): b for b in cls.expand(cls.Options.parse(raw, spec.name))}.values():
            add(backend, by_user=True)
    return list(plans.values())


def merged_entries(plans: list[Planned]) -> list[str]:
    """A note for each configuration several entries of the user's list asked for (it runs once)."""
    return [f"configuration {p.backend_id} is asked for by {p.requested} entries of the backend "
            f"list; it runs once" for p in plans if p.requested > 1]


def _instantiate(name: str, raw: dict[str, Any], cfg: RunConfig) -> Backend:
    cls = BACKENDS.load(name)
    merged = {**cfg.backend_options.get(name, {}), **raw}
    return cls.create(cls.Options.parse(merged, name))
