"""DP-SGD for a linear head in closed form (grad_sample_mode="linear"): the default `dp` rows
train only `nn.Linear` over frozen backbone features, where per-sample clipping needs no
per-sample gradients at all.

For one image i with features x_i and dl_i/dz_i = g_i (z = W x + b), the per-sample
gradients are g_i x_i^T (weight) and g_i (bias), so the flat per-sample norm is
||g_i|| * sqrt(||x_i||^2 + 1) (the ghost-norm identity Opacus' fast gradient clipping uses
for Linear layers) and the clipped sum is one matrix product, (c * g)^T X, with Opacus'
clip factor c_i = min(1, C / (norm_i + 1e-6)). Noise N(0, (sigma C)^2) is added to the sum
and the result divided by the expected batch size, as Opacus' DPOptimizer does with
loss_reduction="mean"; the optimiser (Adam) then steps on that gradient. The accountant is
Opacus' own, stepped once per step with (sigma, q). `tests/test_dp_linear_head.py` checks
the gradient against Opacus' DPOptimizer on the same batch, and that an unclipped variant
is caught.

Why not Opacus' `ghost` mode here: it is the same identity, but it takes a second backward
pass and Opacus' per-step bookkeeping, which on a 1 ms step of a linear layer cost more
than the step (benchmarks/bench_dp.py: ghost 2.5x, hooks 1.9-2.7x, this 1.2-1.4x).
"""

from __future__ import annotations

import torch
from torch import nn

CLIP_EPS = 1e-6           # Opacus' constant in max_grad_norm / (norm + 1e-6)


def clipped_sum(module: nn.Linear, x: torch.Tensor, per_sample_losses,
                max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of clipped per-sample weight gradients, same for the bias, per-sample losses)
    for the batch `x` (B x d). `per_sample_losses(z)` maps logits B x L to B losses."""
    z = nn.functional.linear(x, module.weight.detach(), module.bias.detach()).requires_grad_()
    losses = per_sample_losses(z)
    (g,) = torch.autograd.grad(losses.sum(), z)
    norms = g.norm(dim=1) * torch.sqrt(x.pow(2).sum(1) + 1.0)
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    cg = g * c[:, None]
    return cg.t() @ x, cg.sum(0), losses.detach()


class LinearHeadDPSGD:
    """One DP-SGD step per `step(x, y)` on `module`'s weight and bias through `optimizer`
    (whose parameters they are). `noise(shape, std)` draws the Gaussian noise; `accountant`
    is an Opacus accountant, stepped with (noise_multiplier, sample_rate) per step."""

    def __init__(self, module: nn.Linear, optimizer, per_sample_losses, max_grad_norm: float,
                 noise_multiplier: float, expected_batch_size: int, sample_rate: float,
                 noise, accountant) -> None:
        if not isinstance(module, nn.Linear) or module.bias is None:
            raise ValueError("grad_sample_mode='linear' trains an nn.Linear with a bias (scope=head)")
        self.module, self.optimizer, self.per_sample_losses = module, optimizer, per_sample_losses
        self.max_grad_norm, self.noise_multiplier = float(max_grad_norm), float(noise_multiplier)
        self.expected, self.sample_rate = expected_batch_size, sample_rate
        self.noise, self.accountant = noise, accountant

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The noised, scaled gradient of weight and bias for this batch, and its mean loss."""
        w = self.module.weight
        if len(x):
            gw, gb, losses = clipped_sum(self.module, x, lambda z: self.per_sample_losses(z, y),
                                         self.max_grad_norm)
            loss = float(losses.mean())
        else:   # an empty Poisson batch: the step is noise alone
            gw, gb, loss = torch.zeros_like(w), torch.zeros_like(self.module.bias), 0.0
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:
            gw = gw + self.noise(tuple(gw.shape), std).to(gw)
            gb = gb + self.noise(tuple(gb.shape), std).to(gb)
        return gw / self.expected, gb / self.expected, loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        gw, gb, loss = self.gradients(x, y)
        self.module.weight.grad, self.module.bias.grad = gw, gb
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss
