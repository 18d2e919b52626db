"""Deliberately broken backends, registered through SUITE_EXTRA_BACKENDS in tests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from suite.backend import Backend, BackendOptions
from suite.threat_model import ThreatModel

_TM = ThreatModel(protects=(), from_whom="nobody", adversary="none", parties=("test",),
                  trust_assumptions=("test only",), guarantee_kind="none", guarantee="none",
                  leaks=("everything",), protected_scope="nothing")


@dataclass
class _Opts(BackendOptions):
    batch_size: int = 8


class _Base(Backend):
    track = "inference"
    Options = _Opts

    def threat_model(self):
        return _TM

    def setup(self, ctx):
        self.n = len(ctx.model.pathologies)


class RaisingBackend(_Base):
    name = "raising"

    def predict_proba(self, images, meta=None):
        raise RuntimeError("deliberate failure in predict")


class HangingBackend(_Base):
    name = "hanging"

    def predict_proba(self, images, meta=None):
        time.sleep(3600)


class CrashingBackend(_Base):
    name = "crashing"

    def predict_proba(self, images, meta=None):
        os._exit(9)  # the worker dies without reporting


class BadShapeBackend(_Base):
    name = "badshape"

    def predict_proba(self, images, meta=None):
        return np.full((len(images), self.n + 1), 0.5)


EXTRA = ",".join(f"{n}=tests.faulty_backends:{c}" for n, c in (
    ("raising", "RaisingBackend"), ("hanging", "HangingBackend"), ("crashing", "CrashingBackend"),
    ("badshape", "BadShapeBackend")))
