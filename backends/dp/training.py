"""DP-SGD training core of the `dp` backend: one loop for the private model and its controls.

The three privacy regimes share everything but the gradient treatment, so their AUROCs
differ only by what DP costs:

    none   non-private control: the plain mini-batch gradient (no clipping, no noise)
    clip   clipping-only control: per-sample clipping to `max_grad_norm`, noise multiplier 0
    dp     DP-SGD: per-sample clipping and Gaussian noise of std `noise_multiplier * max_grad_norm`

All three draw the same Poisson-sampled batches (Opacus' `DPDataLoader`, seeded), start from
the same initial weights, use the suite recipe's optimiser (Adam, weight decay, one-cycle LR
schedule; `suite.training.Recipe`) and augmentation, and the same loss. The loss is the
recipe's masked BCE computed per image (mean over the image's known labels) and then
averaged; it equals `suite.training.masked_bce` whenever labels are complete, and unlike
it keeps each image's gradient independent of the other images in the batch, which the
per-sample sensitivity argument of DP-SGD needs. The non-private control divides the summed
gradient by the expected batch size, as Opacus' `DPOptimizer` does, so it is exactly DP-SGD
with an infinite clipping norm and no noise, only computed without per-sample gradients.

Privacy accounting is Opacus' (RDP by default, PRV on request) for the Poisson-subsampled
Gaussian mechanism; `tests/test_dp_accounting.py` cross-checks it with Google's
`dp_accounting`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

PRIVACY_REGIMES = ("none", "clip", "dp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
ACCOUNTANTS = ("rdp", "prv")


class PerSampleMaskedBCE(nn.Module):
    """BCE over each image's known labels (NaN = unknown), averaged per image, then reduced.

    `reduction` follows torch's loss convention ('mean', 'sum', 'none' = one loss per
    image) so Opacus' ghost clipping can ask for per-sample losses.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        safe = torch.where(known, targets, torch.zeros_like(targets))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, safe, reduction="none")
        per_image = (loss * known).sum(1) / known.sum(1).clamp(min=1)
        if self.reduction == "none":
            return per_image
        if self.reduction == "sum":
            return per_image.sum()
        return per_image.mean()


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One loss per image (what the membership-inference audit thresholds)."""
    return PerSampleMaskedBCE("none")(logits, targets)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one training run (recipe + privacy regime)."""

    epochs: int
    batch_size: int                      # expected (Poisson) batch size
    lr: float
    weight_decay: float = 1e-4
    privacy: str = "dp"                  # none | clip | dp
    max_grad_norm: float = 1.0           # ignored when privacy == 'none'
    noise_multiplier: float = 0.0        # used when privacy == 'dp'
    delta: float = 1e-5
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    augment: bool = False                # suite recipe's shift/intensity jitter (images only)
    seed: int = 0                        # initial weights, batch sampling, augmentation
    noise_seed: int = 0                  # the Gaussian noise only

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_REGIMES:
            raise ValueError(f"privacy must be one of {PRIVACY_REGIMES}, got '{self.privacy}'")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}")


@dataclass
class TrainReport:
    privacy: str
    steps: int
    sample_rate: float
    expected_batch_size: int
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float                       # achieved (accountant), inf unless privacy == 'dp'
    delta: float
    accountant: str
    losses: list[float] = field(default_factory=list)   # mean loss per epoch


def steps_and_rate(n: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """Opacus' convention: sample rate 1 / ceil(n / batch), that many steps per epoch."""
    per_epoch = max(1, math.ceil(n / batch_size))
    return epochs * per_epoch, 1.0 / per_epoch


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to Opacus' 0.01 tolerance) whose epsilon is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant,
                                      epsilon_tolerance=0.01))


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps under Opacus' accountant."""
    from opacus.accountants import create_accountant

    if noise_multiplier <= 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def make_opacus_compatible(module: nn.Module) -> nn.Module:
    """Opacus' own fixer (BatchNorm -> GroupNorm), plus out-of-place ReLUs: xrv's in-place
    ReLUs modify views that Opacus' backward hooks hand out."""
    from opacus.validators import ModuleValidator

    module = ModuleValidator.fix(module)
    for m in module.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    errors = ModuleValidator.validate(module.train(), strict=False)
    if errors:
        raise ValueError(f"model is not Opacus-compatible after fixing: {errors}")
    return module


class DenseNetLogits(nn.Module):
    """xrv DenseNet logits (features -> relu -> global average pool -> classifier) without
    xrv's in-place ReLU in `features2`; the same function as `ModelBundle.logits`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.net.features(x))
        return self.net.classifier(nn.functional.adaptive_avg_pool2d(f, 1).flatten(1))


class _Rows(torch.utils.data.Dataset):
    """Rows of two tensors; `__getitems__` fetches a whole batch with one index operation
    instead of stacking it image by image (the DataLoader uses it when present)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [self.x[idx], self.y[idx]]


def _batch_as_is(batch):
    return batch


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    from suite.training import augment_batch

    return augment_batch(x, gen) if len(x) else x


@dataclass
class Prepared:
    """The objects one training run steps through (see `prepare`)."""

    model: nn.Module                 # `module`, or Opacus' per-sample-gradient wrapper of it
    optimizer: torch.optim.Optimizer  # what to step: Adam, or Opacus' DPOptimizer around it
    base_optimizer: torch.optim.Optimizer
    loss_fn: Callable
    loader: torch.utils.data.DataLoader   # Poisson-sampled batches
    engine: object | None            # opacus.PrivacyEngine (its accountant), None for 'none'
    steps: int
    sample_rate: float
    expected_batch_size: int

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradients from the trained module."""
        if self.engine is not None and hasattr(self.model, "_close"):
            self.model._close()


def prepare(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
            cfg: TrainConfig) -> Prepared:
    """Model, optimiser, loss and Poisson loader of one run, identical across regimes except
    for Opacus' per-sample clipping and noise in 'clip' and 'dp'."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    n = len(inputs)
    base = DataLoader(_Rows(inputs, labels), batch_size=cfg.batch_size, collate_fn=_batch_as_is,
                      generator=torch.Generator().manual_seed(cfg.seed))
    steps, rate = steps_and_rate(n, cfg.batch_size, cfg.epochs)
    expected = int(n * rate)  # Opacus' expected batch size
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.privacy == "none":
        summed = PerSampleMaskedBCE("sum")

        def loss_fn(logits, y):  # DP-SGD's scaling (sum / expected batch) with C = inf, sigma = 0
            return summed(logits, y) / expected

        return Prepared(module, optimizer, optimizer, loss_fn, DPDataLoader.from_data_loader(base),
                        None, steps, rate, expected)
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant)
    out = engine.make_private(
        module=module, optimizer=optimizer, data_loader=base, criterion=PerSampleMaskedBCE("mean"),
        noise_multiplier=cfg.noise_multiplier if cfg.privacy == "dp" else 0.0,
        max_grad_norm=cfg.max_grad_norm, poisson_sampling=True,
        grad_sample_mode=cfg.grad_sample_mode,
        noise_generator=torch.Generator().manual_seed(cfg.noise_seed))
    if cfg.grad_sample_mode == "ghost":
        model, dp_optimizer, loss_fn, loader = out
    else:
        model, dp_optimizer, loader = out
        loss_fn = PerSampleMaskedBCE("mean")
    return Prepared(model, dp_optimizer, optimizer, loss_fn, loader, engine, steps, rate, expected)


def train(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
          on_epoch: Callable[[int, float], None] | None = None) -> TrainReport:
    """Train `module` (inputs -> logits) in place under `cfg.privacy`; returns what was spent.

    `module` must already be Opacus-compatible for 'clip' and 'dp' (see
    `make_opacus_compatible`); its initial weights are the caller's (seed them).
    """
    run = prepare(module, inputs, labels, cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(run.base_optimizer, max_lr=cfg.lr,
                                                total_steps=run.steps)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    with warnings.catch_warnings():
        # Opacus' hooks on a first layer whose input needs no gradient: expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            _loop(run, cfg, sched, aug_gen, losses, on_epoch)
        finally:
            run.close()
    module.eval()
    engine = run.engine
    epsilon = float(engine.get_epsilon(cfg.delta)) if cfg.privacy == "dp" else math.inf
    taken = sum(s for _, _, s in engine.accountant.history) if engine else run.steps
    return TrainReport(
        privacy=cfg.privacy, steps=int(taken), sample_rate=run.sample_rate,
        expected_batch_size=run.expected_batch_size,
        noise_multiplier=cfg.noise_multiplier if cfg.privacy == "dp" else 0.0,
        max_grad_norm=cfg.max_grad_norm if cfg.privacy != "none" else math.inf,
        epsilon=epsilon, delta=cfg.delta, accountant=cfg.accountant, losses=losses)


def _loop(run: Prepared, cfg: TrainConfig, sched, aug_gen, losses: list[float], on_epoch) -> None:
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for x, y in run.loader:
            if cfg.augment:
                x = _augment(x, aug_gen)
            if run.engine is None and len(x) == 0:
                sched.step()
                continue
            loss = run.loss_fn(run.model(x), y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            sched.step()
            value = float(loss.item())
            total += value * (run.expected_batch_size if run.engine is None else len(x))
            count += len(x)
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])


@torch.inference_mode()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray | torch.Tensor,
            batch: int = 256) -> torch.Tensor:
    """fn over x in chunks (no autograd), concatenated."""
    x = torch.as_tensor(x)
    if len(x) == 0:
        return fn(x)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
