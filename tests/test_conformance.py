"""One battery for every registered backend (scikit-learn's `parametrize_with_checks` idea).

A backend joins by registering under `suite.backends`; nothing here names one. Each
is run through the real harness loop on a tiny model and dataset.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import psutil
import pytest

from suite.backend import TRACKS, BackendContext
from suite.errors import BackendUnavailable
from suite.harness import measure
from suite.meter import CommMeter
from suite.registry_backends import BACKENDS


def _backend_class(name):
    try:
        cls = BACKENDS.load(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    missing = [m for m in cls.requires if find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {missing} (extra [{cls.extra}])")
    return cls


def _run(cls, tiny_data, tiny_model, tmp_path: Path):
    backend = cls.create(cls.Options.parse(dict(cls.test_options), cls.name))
    ctx = BackendContext(model=tiny_model, meter=CommMeter(), workdir=tmp_path / cls.name,
                         seed=0, threads=2, quick=True)
    ctx.workdir.mkdir(parents=True)
    test = tiny_data.split("test")
    n = backend.max_images() or len(test)
    test = test.subset(np.arange(min(n, len(test))))
    train = tiny_data.split("train") if backend.track == "training" else None
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    probs, timings = measure(backend, ctx, test, train, progress=False)
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE}
    return backend, ctx, test, probs, timings, after - before


@pytest.fixture(scope="module")
def plaintext_probs(tiny_data, tiny_model):
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(tiny_data.split("test").images)
        return torch.sigmoid(tiny_model.logits(x).double()).numpy()


@pytest.mark.parametrize("name", BACKENDS.names())
def test_backend_conforms(name, tiny_data, tiny_model, plaintext_probs, tmp_path):
    cls = _backend_class(name)
    assert cls.track in TRACKS
    backend, ctx, test, probs, timings, leftover = _run(cls, tiny_data, tiny_model, tmp_path)

    # outputs: one probability per image and label
    assert probs.shape == (len(test), len(tiny_data.label_names))
    assert np.all((probs >= 0) & (probs <= 1))
    assert sum(timings.batch_sizes) == len(test)

    # fidelity: inference backends reproduce plaintext within their declared tolerance
    if cls.track == "inference" and cls.tolerance is not None:
        diff = np.abs(probs - plaintext_probs[: len(test)]).max()
        assert diff <= cls.tolerance, f"{name}: max |dp| {diff:.2e} > tolerance {cls.tolerance}"

    # a complete threat model
    tm = backend.threat_model()
    assert tm.missing_fields() == [], f"{name}: threat model lacks {tm.missing_fields()}"
    if cls.track != "reference":
        assert tm.protects, f"{name} protects nothing"

    # more than one party talking: bytes were metered
    if len(tm.parties) > 1 and cls.track == "inference":
        online = ctx.meter.totals("online")
        assert online.bytes_sent > 0, f"{name} has {len(tm.parties)} parties but metered no bytes"

    # clean teardown: no process left behind
    assert not leftover, f"{name} left processes running: {leftover}"
    assert isinstance(backend.versions(), dict)
