"""Privacy audit for the FL backend: what a curious server reconstructs from what it sees.

A gradient-inversion attack in the style of Inverting Gradients (Geiping et al. 2020):
dummy images are optimised with signed Adam so that the gradient they induce points the
same way as the observed update (cosine distance), under a total-variation prior. The
attacker is the aggregation server (semi-honest): it knows the global model it sent, the
architecture, the batch size and the batch's labels (label inference from the last layer
is routine, so granting it is the conservative choice). It sees one of three things:

  update      one site's plain update (FedAvg). Clipping only rescales what the server
              sees and the cosine loss is scale-invariant, so this is also the server's view
              under central DP with client-side clipping (`fl:privacy=dp`): the noise is
              added to the aggregate after the server has seen the clipped update.
  update-ldp  the update clipped and noised at the site before it leaves (`fl:privacy=ldp`:
              clip to C, Gaussian noise on every coordinate with the std calibrated for
              sensitivity 2C by the analytic Gaussian mechanism, backends/fl/privacy.py).
  aggregate   only the mean of all sites' updates (`fl:privacy=secagg`, SecAgg+); the
              attacker tries to recover the target site's images from it.

The site's update is taken in FedSGD form (one gradient step on the batch): the most
invertible update a site can send. BatchNorm is evaluated with the global model's running
statistics (frozen), as when a site fine-tunes with frozen statistics. With BatchNorm in
training mode on 1-4 images at 32 px the last dense block sees 1x1 maps, per-batch
normalisation makes the gradient a near-discontinuous function of the pixels (moving
the input by 0.1 % flips it), and no optimisation-based inversion gets anywhere; the
frozen-statistics update is the more invertible case, so the audit errs towards leakage.

Quality is PSNR and SSIM (scikit-image) between each original and its best-matching
reconstruction (a batch's order is not identifiable), images scaled to [-1, 1]; the flat
grey image at the batch mean is the "knows nothing" baseline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

VIEWS = ("update", "update-ldp", "aggregate")
XRV_SCALE = 1024.0


@dataclass
class AttackConfig:
    images: int = 2          # batch size of the attacked update (1-4)
    size: int = 32           # side length the attack runs at
    steps: int = 150         # Adam steps
    lr: float = 0.1
    tv: float = 1e-2         # weight of the total-variation prior
    seed: int = 0
    bn_train: bool = False   # BatchNorm mode of the attacked update (see module docstring)


@dataclass
class AttackResult:
    view: str
    psnr: float
    ssim: float
    psnr_per_image: list[float] = field(default_factory=list)
    ssim_per_image: list[float] = field(default_factory=list)
    reconstruction: np.ndarray | None = None   # [B, size, size] in [-1, 1]
    note: str = ""


def densenet_forward(net) -> Callable:
    """Logits of an xrv DenseNet (what every suite backend computes)."""
    return lambda x: net.classifier(net.features2(x))


def _loss(forward, x, y):
    from suite.training import masked_bce

    return masked_bce(forward(x), y)


def batch_gradient(net, forward, x, y, bn_train: bool):
    """What one FedSGD step on (x, y) sends, as a gradient (one tensor per parameter)."""
    import torch

    net.train(bn_train)
    params = [p for p in net.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(_loss(forward, x, y), params)]


def ldp_view(grads, lr: float, clip: float, epsilon: float, delta: float, gen):
    """What `fl:privacy=ldp` lets out: the weight update (-lr * g) clipped to `clip`, plus
    Gaussian noise with the std it calibrates (sensitivity 2 x clip, analytic Gaussian).
    The audit draws that noise from a seeded generator so the attack is reproducible; the
    attacker never sees it.

    Returned in gradient orientation (divided by -lr) so the cosine target keeps its sign.
    """
    import torch

    from backends.fl.privacy import calibrate_std

    update = [-lr * g for g in grads]
    norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update)))
    scale = min(1.0, clip / max(norm, 1e-12))
    std = calibrate_std(epsilon, delta, clip)
    noisy = [u * scale + std * torch.randn(u.shape, generator=gen) for u in update]
    return [n / -lr for n in noisy], norm, std


def _tv(z):
    return ((z[:, :, 1:, :] - z[:, :, :-1, :]).abs().mean()
            + (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().mean())


def invert(net, forward, target, labels, cfg: AttackConfig) -> np.ndarray:
    """Dummy images (in [-1, 1]) whose gradient points where `target` points."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    flat_target = torch.cat([t.reshape(-1) for t in target])
    flat_target = flat_target / flat_target.norm().clamp_min(1e-12)
    gen = torch.Generator().manual_seed(cfg.seed)
    z = (0.3 * torch.randn(labels.shape[0], 1, cfg.size, cfg.size, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(cfg.steps * f) for f in (0.5, 0.75, 0.9)], gamma=0.3)
    net.train(cfg.bn_train)
    for _ in range(cfg.steps):
        opt.zero_grad()
        grads = torch.autograd.grad(_loss(forward, z * XRV_SCALE, labels), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        cos = (flat * flat_target).sum() / flat.norm().clamp_min(1e-12)
        (1 - cos + cfg.tv * _tv(z)).backward()
        z.grad.sign_()          # signed gradients, as in Inverting Gradients
        opt.step()
        sched.step()
        with torch.no_grad():
            z.clamp_(-1, 1)
    return z.detach()[:, 0].numpy()


def score(originals: np.ndarray, recon: np.ndarray) -> tuple[list[float], list[float]]:
    """Per original: PSNR/SSIM of its best-matching reconstruction."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims = [], []
    for o in originals:
        cand = [(peak_signal_noise_ratio(o, r, data_range=2.0),
                 structural_similarity(o, r, data_range=2.0)) for r in recon]
        p, s = max(cand, key=lambda c: c[0])
        psnrs.append(float(p))
        ssims.append(float(s))
    return psnrs, ssims


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average [B, 1, H, W] images to side `size` (bilinear when H is not a multiple)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if x.shape[-1] == size:
        return x.numpy()
    if x.shape[-1] % size == 0:
        return torch.nn.functional.avg_pool2d(x, x.shape[-1] // size).numpy()
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                           align_corners=False).numpy()


def run_audit(net, site_batches: list[tuple[np.ndarray, np.ndarray]], cfg: AttackConfig, *,
              lr: float, clip: float, epsilon: float, delta: float, views=VIEWS,
              forward: Callable | None = None, workdir: Path | None = None) -> list[AttackResult]:
    """Attack site 0's batch under each view; the other sites' batches only feed the aggregate.

    `site_batches`: per site, (images [B, 1, H, W] in xrv range, labels [B, L]); `net` is the
    global model the server sent (copied, never modified); `forward(net)` gives logits
    (default: xrv DenseNet). Returns one result per view plus a 'baseline' (flat grey).
    """
    import torch

    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(True)
    fwd = (forward or densenet_forward)(net)
    batches = [(torch.from_numpy(downsample(x, cfg.size)),
                torch.from_numpy(np.nan_to_num(np.asarray(y, dtype=np.float32), nan=0.0)))
               for x, y in site_batches]
    x0, y0 = batches[0]
    originals = (x0[:, 0].numpy() / XRV_SCALE).clip(-1, 1)
    g0 = batch_gradient(net, fwd, x0, y0, cfg.bn_train)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    results = []
    flat = np.full_like(originals[:1], originals.mean())
    p, s = score(originals, flat)
    results.append(AttackResult("baseline", float(np.mean(p)), float(np.mean(s)), p, s, flat,
                                "flat grey image at the batch mean: what knowing nothing gives"))
    for view in views:
        if view == "update":
            target = g0
            note = "one site's plain update (also the server's view under central DP)"
        elif view == "update-ldp":
            target, norm, std = ldp_view(g0, lr, clip, epsilon, delta, gen)
            note = (f"local-DP view: update norm {norm:.3g} clipped to {clip:g}, noise std "
                    f"{std:.3g} per coordinate (epsilon={epsilon:g}, delta={delta:g})")
        elif view == "aggregate":
            grads = [g0] + [batch_gradient(net, fwd, x, y, cfg.bn_train) for x, y in batches[1:]]
            target = [sum(parts) / len(grads) for parts in zip(*grads)]
            note = f"SecAgg+ view: mean of {len(grads)} sites' updates"
        else:
            raise ValueError(f"unknown audit view '{view}'; use {VIEWS}")
        recon = invert(net, fwd, target, y0, cfg)
        p, s = score(originals, recon)
        results.append(AttackResult(view, float(np.mean(p)), float(np.mean(s)), p, s, recon, note))
    if workdir is not None:
        save_pictures(Path(workdir), originals, [r for r in results if r.view != "baseline"])
    return results


def save_pictures(workdir: Path, originals: np.ndarray, results: list[AttackResult]) -> list[Path]:
    """One PNG per view (originals on top, reconstructions below) and one overview grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir.mkdir(parents=True, exist_ok=True)

    def strip(images):
        return np.concatenate([((np.asarray(a) + 1) / 2).clip(0, 1) for a in images], axis=1)

    top = strip(originals)
    paths, rows = [], [top]
    for r in results:
        row = strip(r.reconstruction)
        path = workdir / f"inversion-{r.view}.png"
        plt.imsave(path, np.concatenate([top, row], axis=0), cmap="gray", vmin=0, vmax=1)
        paths.append(path)
        rows.append(row)
    path = workdir / "inversion-overview.png"
    plt.imsave(path, np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=1)
    return paths + [path]


def control_cnn(n_labels: int, size: int = 32, seed: int = 0):
    """Positive control for the attack: a small ReLU CNN whose classifier sees spatial maps.

    Gradient inversion recovers recognisable images from this architecture in a few hundred
    steps, so a low score on the DenseNet says something about the DenseNet, not the attack.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    side = size // 4
    return nn.Sequential(
        nn.Conv2d(1, 12, 5, padding=2, stride=2), nn.ReLU(),
        nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.ReLU(),
        nn.Conv2d(12, 12, 5, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * side * side, n_labels))


def control_forward(net) -> Callable:
    return lambda x: net(x / XRV_SCALE)
