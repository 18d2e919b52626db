"""Measures the harness itself: returns constant probabilities without computing.

Its latency and memory are the floor every other backend's figures sit on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.threat_model import ThreatModel


@dataclass
class NullOptions(BackendOptions):
    batch_size: int = 32


class NullBackend(Backend):
    name = "null"
    track = "reference"   # a floor to read other rows against, compared with nothing
    Options = NullOptions
    tolerance = None      # not meant to reproduce the model

    def threat_model(self) -> ThreatModel:
        return ThreatModel(
            protects=(),
            from_whom="nobody",
            adversary="none considered",
            parties=("harness only",),
            trust_assumptions=("measures harness overhead; runs no model",),
            guarantee_kind="none",
            guarantee="no protection and no model: harness overhead floor",
            leaks=("nothing is computed",),
            protected_scope="nothing (no model runs)",
        )

    def setup(self, ctx: BackendContext) -> None:
        self.n_labels = len(ctx.model.pathologies)

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        return np.full((len(images), self.n_labels), 0.5)
