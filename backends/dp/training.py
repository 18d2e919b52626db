"""DP-SGD training core of the `dp` backend: one loop for the private model and its controls.

The three privacy regimes share everything but the gradient treatment, so their AUROCs
differ only by what DP costs:

    none   non-private control: the plain mini-batch gradient (no clipping, no noise)
    clip   clipping-only control: per-sample clipping to `max_grad_norm`, noise multiplier 0
    dp     DP-SGD: per-sample clipping and Gaussian noise of std `noise_multiplier * max_grad_norm`

All three draw the same Poisson-sampled batches (`PoissonBatches`, one random source), start from
the same initial weights, use the suite recipe's optimiser (Adam, weight decay, one-cycle LR
schedule; `suite.training.Recipe`) and augmentation, and the same loss. The loss is the
recipe's masked BCE computed per image (mean over the image's known labels) and then
averaged; it equals `suite.training.masked_bce` whenever labels are complete, and unlike
it keeps each image's gradient independent of the other images in the batch, which the
per-sample sensitivity argument of DP-SGD needs. The non-private control divides the summed
gradient by the expected batch size, as Opacus' `DPOptimizer` does, so it is exactly DP-SGD
with an infinite clipping norm and no noise, only computed without per-sample gradients.

Privacy unit (`groups`): without groups every image is a unit (example-level DP). With
`groups` (one patient index per image) the unit is a patient: Poisson sampling picks patients
and each sampled patient contributes ONE of their images, drawn uniformly at random, so one
clipped gradient per patient per step; the Poisson-subsampled Gaussian analysis then holds
with patients in place of images (user-level DP for adding or removing a whole patient).

Randomness (`secure`): the batches, the per-patient image choice and the Gaussian noise come
from the operating system's CSPRNG (`os.urandom`) when `secure` is set, so nobody holding the
run's published seed can regenerate the noise. Opacus' own `secure_mode` needs `torchcsprng`,
which has no build for current torch; this is the equivalent: the same DP-SGD, noise drawn
as the sum of four CSPRNG Box-Muller normals scaled by 1/2 (Opacus' secure-mode construction
against floating-point attacks, Holohan & Braghin 2021), uniforms from 53 random bits. Without
`secure` they come from seeded streams (reproducible tests; never for a reported row).

Privacy accounting is Opacus' (RDP by default, PRV on request) for the Poisson-subsampled
Gaussian mechanism; `tests/test_dp_accounting.py` and `crosscheck_epsilon` (each run) check
it with Google's `dp_accounting`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

PRIVACY_REGIMES = ("none", "clip", "dp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "linear")   # linear: backends.dp.linear_head
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
    noise_seed: int = 0                  # the Gaussian noise only (ignored when secure)
    secure: bool = False                 # CSPRNG batches, image choice and noise (see module doc)

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
    n_units: int                         # images, or patients when trained per patient
    unit: str                            # image | patient
    secure: bool
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float                       # achieved (accountant), inf unless privacy == 'dp' (NaN: not accounted)
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


def crosscheck_epsilon(noise_multiplier: float, sample_rate: float, steps: int,
                       delta: float) -> float:
    """The same mechanism's epsilon from an independent accountant: Google's dp_accounting
    PLD (near-exact; RDP, Opacus' default, is an upper bound of it)."""
    import dp_accounting

    if noise_multiplier <= 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad_output(module, inputs, output):
    return _ContiguousGrad.apply(output)


def make_opacus_compatible(module: nn.Module, contiguous_conv_grads: bool = True) -> nn.Module:
    """Opacus' own fixer (BatchNorm -> GroupNorm), plus out-of-place ReLUs (xrv's in-place
    ReLUs modify views that Opacus' backward hooks hand out), plus contiguous gradients into
    every convolution: DenseNet's concatenations hand convs strided gradients, which torch's
    ExpandedWeights (grad_sample_mode=ew) cannot take on batches under 32 images."""
    from opacus.validators import ModuleValidator

    module = ModuleValidator.fix(module)
    for m in module.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if contiguous_conv_grads and isinstance(m, nn.Conv2d):
            m.register_forward_hook(_contiguous_grad_output)
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


class Uniforms:
    """Uniform draws in [0, 1): the OS CSPRNG (53 random bits each) or a seeded stream."""

    def __init__(self, secure: bool, seed: int = 0) -> None:
        self.secure = secure
        self._rng = None if secure else np.random.default_rng(seed)

    def __call__(self, n: int) -> np.ndarray:
        if self.secure:
            bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
            return bits.astype(np.float64) * 2.0 ** -53
        return self._rng.random(n)


def csprng_gaussian(shape, std: float, uniforms: Uniforms) -> torch.Tensor:
    """N(0, std^2) noise: sum of four Box-Muller normals from `uniforms`, times std / 2."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniforms(4 * n).reshape(2, 2 * n)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))            # 1 - u in (0, 1]: log is finite
    angle = 2.0 * np.pi * u[1]
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])   # 4n normals
    z = normals.reshape(4, n).sum(0) * (std / 2.0)
    return torch.from_numpy(z.reshape(shape))


class CSPRNGNoise:
    """Mixin for Opacus' DP optimisers: the same clipping, accounting and scaling, with the
    Gaussian noise drawn from `self.csprng` (a `Uniforms`) instead of torch's PRNG. Opacus
    first runs its own `add_noise` with std 0 (p.grad = clipped sum, bookkeeping intact);
    the accountant, which reads `noise_multiplier` after the step, sees the real value."""

    csprng: Uniforms

    def add_noise(self):
        sigma = self.noise_multiplier
        self.noise_multiplier = 0.0
        try:
            super().add_noise()
        finally:
            self.noise_multiplier = sigma
        std = sigma * self.max_grad_norm
        if std > 0:
            for p in self.params:
                p.grad.add_(csprng_gaussian(tuple(p.grad.shape), std, self.csprng).to(p.grad))


def with_csprng_noise(optimizer, uniforms: Uniforms):
    """Switch an Opacus DP optimiser to CSPRNG noise, in place."""
    cls = type(optimizer)
    optimizer.__class__ = type(f"CSPRNG{cls.__name__}", (CSPRNGNoise, cls), {})
    optimizer.csprng = uniforms
    return optimizer


class PoissonBatches(torch.utils.data.Sampler):
    """Poisson sampling (each unit in each batch independently with probability q), from
    `uniforms`: Opacus' UniformWithReplacementSampler with a choice of random source."""

    def __init__(self, num_units: int, sample_rate: float, steps: int, uniforms: Uniforms) -> None:
        self.num_units, self.sample_rate, self.steps, self.uniforms = num_units, sample_rate, steps, uniforms

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield np.flatnonzero(self.uniforms(self.num_units) < self.sample_rate).tolist()


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


class OnePerPatient(torch.utils.data.Dataset):
    """Patients as the sampling unit: fetching patient k returns one of k's images, drawn
    uniformly from `uniforms` at every fetch, so a batch holds at most one image per patient."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, uniforms: Uniforms) -> None:
        self.x, self.y, self.uniforms = x, y, uniforms
        order = np.argsort(groups, kind="stable")
        _, starts = np.unique(groups[order], return_index=True)
        self.members = np.split(order, starts[1:])

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, k):
        return self.__getitems__([k])

    def __getitems__(self, patients):
        u = self.uniforms(len(patients))
        rows = [int(m[min(int(ui * len(m)), len(m) - 1)]) for m, ui in
                zip((self.members[int(k)] for k in patients), u)]
        idx = torch.as_tensor(rows, dtype=torch.long)
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
    fused: object | None = None      # LinearHeadDPSGD (grad_sample_mode="linear"), else None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on the batch (x, y); returns its mean loss."""
        if self.fused is not None:
            return self.fused.step(x, y)
        self.optimizer.zero_grad()         # before the forward: ew refuses stale grad_sample
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradients from the trained module."""
        if self.engine is not None and hasattr(self.model, "_close"):
            self.model._close()


def prepare(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
            cfg: TrainConfig, groups: np.ndarray | None = None) -> Prepared:
    """Model, optimiser, loss and Poisson loader of one run, identical across regimes except
    for Opacus' per-sample clipping and noise in 'clip' and 'dp'. `groups`: patient index per
    image for patient-level sampling (see the module docstring)."""
    from torch.utils.data import DataLoader

    uniforms = Uniforms(cfg.secure, cfg.seed)
    dataset = (_Rows(inputs, labels) if groups is None
               else OnePerPatient(inputs, labels, np.asarray(groups), uniforms))
    n = len(dataset)
    steps, rate = steps_and_rate(n, cfg.batch_size, cfg.epochs)
    loader = DataLoader(dataset, collate_fn=_batch_as_is,
                        batch_sampler=PoissonBatches(n, rate, steps // cfg.epochs, uniforms))
    expected = int(n * rate)  # Opacus' expected batch size
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.privacy == "none":
        summed = PerSampleMaskedBCE("sum")

        def loss_fn(logits, y):  # DP-SGD's scaling (sum / expected batch) with C = inf, sigma = 0
            return summed(logits, y) / expected

        return Prepared(module, optimizer, optimizer, loss_fn, loader, None, steps, rate, expected)
    if cfg.grad_sample_mode == "linear":
        return _prepare_linear(module, optimizer, loader, cfg, uniforms, steps, rate, expected)
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus' secure_mode needs torchcsprng; our CSPRNG path replaces it (module docstring)
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant)
    # poisson_sampling=False: Opacus keeps our loader, whose sampler already is Poisson (over
    # images or patients); its sample rate is 1 / len(loader) = q, as the accountant needs
    out = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, criterion=PerSampleMaskedBCE("mean"),
        noise_multiplier=cfg.noise_multiplier if cfg.privacy == "dp" else 0.0,
        max_grad_norm=cfg.max_grad_norm, poisson_sampling=False,
        grad_sample_mode=cfg.grad_sample_mode,
        noise_generator=None if cfg.secure else torch.Generator().manual_seed(cfg.noise_seed))
    if cfg.grad_sample_mode == "ghost":
        model, dp_optimizer, loss_fn, loader = out
    else:
        model, dp_optimizer, loader = out
        loss_fn = PerSampleMaskedBCE("mean")
    if cfg.secure:
        with_csprng_noise(dp_optimizer, uniforms)
    return Prepared(model, dp_optimizer, optimizer, loss_fn, loader, engine, steps, rate, expected)


class AccountantOnly:
    """What `train` reads of an Opacus PrivacyEngine (its accountant and epsilon) when the
    step is not Opacus' DPOptimizer (grad_sample_mode="linear")."""

    def __init__(self, accountant) -> None:
        self.accountant = accountant

    def get_epsilon(self, delta: float) -> float:
        return self.accountant.get_epsilon(delta=delta)


def _prepare_linear(module, optimizer, loader, cfg: TrainConfig, uniforms: "Uniforms",
                    steps: int, rate: float, expected: int) -> Prepared:
    """DP-SGD of a linear head in closed form (backends.dp.linear_head), Opacus' accountant."""
    from opacus.accountants import create_accountant

    from backends.dp.linear_head import LinearHeadDPSGD

    gen = torch.Generator().manual_seed(cfg.noise_seed)
    if cfg.secure:
        def noise(shape, std):
            return csprng_gaussian(shape, std, uniforms)
    else:
        def noise(shape, std):
            return torch.normal(0.0, std, shape, generator=gen)
    sigma = cfg.noise_multiplier if cfg.privacy == "dp" else 0.0
    fused = LinearHeadDPSGD(module, optimizer, PerSampleMaskedBCE("none"), cfg.max_grad_norm, sigma,
                            expected, rate, noise, create_accountant(mechanism=cfg.accountant))
    return Prepared(module, optimizer, optimizer, None, loader, AccountantOnly(fused.accountant),
                    steps, rate, expected, fused=fused)


def train(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
          on_epoch: Callable[[int, float], None] | None = None,
          groups: np.ndarray | None = None, account: bool = True) -> TrainReport:
    """Train `module` (inputs -> logits) in place under `cfg.privacy`; returns what was spent.

    `module` must already be Opacus-compatible for 'clip' and 'dp' (see
    `make_opacus_compatible`); its initial weights are the caller's (seed them). `groups`
    (patient index per image) makes the patient the privacy unit. `account=False` leaves
    the report's epsilon NaN: a caller that accounted the planned mechanism before training
    (the dp backend's `prepare_fit`) keeps that work out of the timed training.
    """
    run = prepare(module, inputs, labels, cfg, groups)
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
    epsilon = math.inf
    if cfg.privacy == "dp":
        epsilon = float(engine.get_epsilon(cfg.delta)) if account else math.nan
    taken = sum(s for _, _, s in engine.accountant.history) if engine else run.steps
    return TrainReport(
        privacy=cfg.privacy, steps=int(taken), sample_rate=run.sample_rate,
        expected_batch_size=run.expected_batch_size, n_units=len(run.loader.dataset),
        unit="image" if groups is None else "patient", secure=cfg.secure,
        noise_multiplier=cfg.noise_multiplier if cfg.privacy == "dp" else 0.0,
        max_grad_norm=cfg.max_grad_norm if cfg.privacy != "none" else math.inf,
        epsilon=epsilon, delta=cfg.delta, accountant=cfg.accountant, losses=losses)


def batches(run: Prepared):
    """The run's Poisson batches. Our own loader (non-private and `linear` runs) is read
    directly, sampler then `__getitems__`, which is exactly what its DataLoader does (no
    workers, identity collate) without the DataLoader's per-batch overhead; Opacus' modes
    iterate the loader make_private returned."""
    if run.engine is None or run.fused is not None:
        dataset = run.loader.dataset
        for indices in run.loader.batch_sampler:
            yield dataset.__getitems__(indices)
    else:
        yield from run.loader


def _loop(run: Prepared, cfg: TrainConfig, sched, aug_gen, losses: list[float], on_epoch) -> None:
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for x, y in batches(run):
            if cfg.augment:
                x = _augment(x, aug_gen)
            if len(x) == 0 and run.fused is None and (run.engine is None or cfg.grad_sample_mode != "ghost"):
                if run.engine is not None:
                    noise_only_step(run.optimizer)
                sched.step()
                continue
            value = run.step(x, y)
            sched.step()
            total += value * (run.expected_batch_size if run.engine is None else len(x))
            count += len(x)
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])


def noise_only_step(optimizer) -> None:
    """An empty Poisson batch still takes its DP-SGD step (a zero clipped sum plus noise),
    without a forward pass: torch's ExpandedWeights (ew) refuses batch size 0."""
    optimizer.zero_grad()
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


@torch.inference_mode()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray | torch.Tensor,
            batch: int = 256) -> torch.Tensor:
    """fn over x in chunks (no autograd), concatenated."""
    x = torch.as_tensor(x)
    if len(x) == 0:
        return fn(x)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
