"""The one plaintext training recipe: the default model, `suite train` and the
training-track controls all use it, so their AUROCs are comparable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from suite.data.imageset import ImageSet


@dataclass(frozen=True)
class Recipe:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE over known labels only (NaN = unknown label, common in real CXR sets)."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small shifts and intensity jitter: cheap, and keeps the tiny model from memorising."""
    shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    scale = 1.0 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5)
    return (x * scale).clamp(-1024, 1024)


def train_logits_model(
    forward: Callable[[torch.Tensor], torch.Tensor],
    parameters,
    data: ImageSet,
    output_index: list[int],
    recipe: Recipe,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Adam on masked BCE; returns the mean loss per epoch."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    cols = torch.tensor(output_index)
    opt = torch.optim.Adam(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * int(np.ceil(len(data) / recipe.batch_size)))
    history = []
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(data), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            x = images[idx]
            if recipe.augment:
                x = augment_batch(x, gen)
            loss = masked_bce(forward(x)[:, cols], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, history[-1])
    return history
