"""The reference: the vendor's model run in the clear on the hospital's images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.threat_model import ThreatModel


@dataclass
class PlaintextOptions(BackendOptions):
    batch_size: int = 32


class PlaintextBackend(Backend):
    name = "plaintext"
    track = "reference"
    Options = PlaintextOptions
    tolerance = 0.0

    def threat_model(self) -> ThreatModel:
        return ThreatModel(
            protects=(),
            from_whom="nobody",
            adversary="none considered",
            parties=("one host holding both images and weights",),
            trust_assumptions=("the host sees images, weights and predictions",),
            guarantee_kind="none",
            guarantee="no protection: reference for accuracy and cost",
            leaks=("input images", "model weights", "predictions"),
            protected_scope="nothing",
        )

    def setup(self, ctx: BackendContext) -> None:
        import torch

        self.torch = torch
        self.model = ctx.model

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        with self.torch.inference_mode():
            logits = self.model.logits(self.torch.from_numpy(images))
        return self.torch.sigmoid(logits.double()).numpy()

    def versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}
