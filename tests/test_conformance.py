"""One battery for every configuration of every registered backend (scikit-learn's
`parametrize_with_checks` idea).

A backend joins by registering under `suite.backends`; nothing here names one. Each entry
declares the option overlays that reach its engines and modes (`conformance_variants`); the
configurations their `expand()` yields (sweep points, controls) run through the real harness
loop on a tiny model and dataset, and through the same JSON trip to the worker.

The first overlay runs every configuration it expands to. A later overlay runs the row it is
about (the first configuration it expands to) and leaves out the controls it adds: those are
the first overlay's controls with the overlay's option set, code that the first overlay's
controls and the later overlay's own row already run (DP's non-private and clipping-only
controls under `scope=full` and `secure_mode`: 4 trainings of 9). SUITE_CONFORMANCE_ALL=1 runs
them too.
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from suite.backend import TRACKS, Backend
from suite.errors import BackendUnavailable
from suite.planning import options_dict
from suite.registry_backends import BACKENDS
from tests.shared_runs import SHARED_LABELS, run_tiny

ALL_CONFIGURATIONS = os.environ.get("SUITE_CONFORMANCE_ALL") == "1"


def _configurations() -> list:
    """(entry, variant overlay, configuration label) for every configuration, or a skip."""
    params, seen = [], set()
    for name in BACKENDS.names():
        try:
            cls = BACKENDS.load(name)
        except BackendUnavailable as exc:
            params.append(pytest.param(name, {}, None, marks=pytest.mark.skip(reason=str(exc)), id=name))
            continue
        missing = [m for m in cls.requires if find_spec(m) is None]
        if missing:
            reason = f"{name} needs {missing} (extra [{cls.extra}])"
            params.append(pytest.param(name, {}, None, marks=pytest.mark.skip(reason=reason), id=name))
            continue
        for k, variant in enumerate(cls.conformance_variants):
            try:
                configs = cls.expand(cls.Options.parse({**cls.test_options, **variant}, name))
            except BackendUnavailable as exc:
                label = f"{name}{json.dumps(variant, sort_keys=True)}"
                params.append(pytest.param(name, variant, None, marks=pytest.mark.skip(reason=str(exc)),
                                           id=label))
                continue
            if k > 0 and not ALL_CONFIGURATIONS:
                configs = configs[:1]        # the overlay's own row (see the module docstring)
            for config in configs:           # a control shared by two variants runs once
                if config.config_label() not in seen:
                    seen.add(config.config_label())
                    params.append(pytest.param(name, variant, config.config_label(), id=config.config_label()))
    return params


def _config(name: str, variant: dict, label: str) -> Backend:
    cls = BACKENDS.load(name)
    for config in cls.expand(cls.Options.parse({**cls.test_options, **variant}, name)):
        if config.config_label() == label:
            return config
    raise AssertionError(f"{label} is no longer among {name}'s configurations")


def _run(backend: Backend, tiny_data, tiny_model, tmp_path: Path):
    run = run_tiny(backend, tiny_data, tiny_model, tmp_path, threads=2)
    return run.ctx, run.test, run.probs, run.timings, run.audit, run.leftover


@pytest.fixture(scope="module")
def plaintext_probs(tiny_data, tiny_model):
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(tiny_data.split("test").images)
        return torch.sigmoid(tiny_model.logits(x).double()).numpy()


@pytest.mark.parametrize("name,variant,label", _configurations())
def test_configuration_conforms(name, variant, label, tiny_data, tiny_model, plaintext_probs, tmp_path,
                                shared_run):
    backend = _config(name, variant, label)
    cls = type(backend)
    assert cls.track in TRACKS

    # options survive the trip to the worker: JSON, re-parsed, re-created, same configuration
    shipped = json.loads(json.dumps(options_dict(backend)))
    registered = BACKENDS.load(name)
    rebuilt = registered.create(registered.Options.parse(shipped, name))
    assert type(rebuilt) is cls and rebuilt.config_label() == label
    assert options_dict(rebuilt) == options_dict(backend)

    if label in SHARED_LABELS:     # test_fl.py asserts on the same run (tests/shared_runs.py)
        run = shared_run(backend)
        backend = run.backend
        ctx, test, probs, timings, audit, leftover = (run.ctx, run.test, run.probs, run.timings,
                                                      run.audit, run.leftover)
    else:
        ctx, test, probs, timings, audit, leftover = _run(backend, tiny_data, tiny_model, tmp_path)

    # outputs: one probability per image and label
    assert probs.shape == (len(test), len(tiny_data.label_names))
    assert np.all((probs >= 0) & (probs <= 1))
    assert sum(timings.batch_sizes) == len(test)
    assert audit.status in ("none", "ok"), f"{label}: audit {audit.status}: {audit.error}"

    # fidelity: within the declared tolerance of the configuration's own reference
    if cls.tolerance is not None:
        reference = backend.reference()
        if isinstance(reference, Backend):
            _, _, ref_probs, _, _, _ = _run(reference, tiny_data, tiny_model, tmp_path / "reference")
        else:
            ref_probs = plaintext_probs[: len(test)]
        diff = np.abs(probs - ref_probs).max()
        assert diff <= cls.tolerance, f"{label}: max |dp| {diff:.2e} > tolerance {cls.tolerance}"

    # a complete threat model
    tm = backend.threat_model()
    assert tm.missing_fields() == [], f"{label}: threat model lacks {tm.missing_fields()}"
    if cls.track != "reference":
        assert tm.protects or tm.guarantee_kind == "none", f"{label} protects nothing and says so nowhere"

    # more than one party talking: bytes were metered
    if len(tm.parties) > 1 and cls.track == "inference":
        online = ctx.meter.totals("online")
        assert online.bytes_sent > 0, f"{label} has {len(tm.parties)} parties but metered no bytes"

    # clean teardown: no process left behind
    assert not leftover, f"{label} left processes running: {leftover}"
    assert isinstance(backend.versions(), dict)
