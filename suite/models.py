"""The model family every backend runs: torchxrayvision's DenseNet.

`--model` accepts
  small-densenet                  a small xrv DenseNet trained on the fly on the training split
                                  (cached by config hash; the synthetic default)
  densenet121-random              xrv DenseNet-121 with untrained weights (timing only)
  xrv:<weights>                   a torchxrayvision weights name, from its cache
  <path>.pt                       a checkpoint written by `suite train`
Backends get a `ModelBundle` and treat `net` as the vendor's private model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.errors import SuiteError, unknown
from suite.hashing import cache_key  # noqa: F401  (re-exported)

SMALL_DENSENET = dict(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=4)
DENSENET121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4)
CHECKPOINT_FORMAT = 1


@dataclass
class ModelBundle:
    """A model plus what it takes to use it correctly."""

    net: nn.Module                    # xrv DenseNet; net.features2 + net.classifier give logits
    name: str
    architecture: dict[str, Any]
    pathologies: list[str]            # one name per output ('' = unused output)
    resolution: int                   # input side length the model expects
    source: str                       # trained-on-the-fly / xrv-weights / checkpoint / random
    preprocessing: str = "xrv: 1 channel, [-1024, 1024], centre crop, resize"
    data_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs without xrv's op_norm calibration, the quantity every backend reproduces."""
        return self.net.classifier(self.net.features2(x))

    def output_index(self, label_names: list[str]) -> list[int]:
        """Model output column for each dataset label; a label the model lacks is an error."""
        missing = [n for n in label_names if n not in self.pathologies]
        if missing:
            raise SuiteError(
                f"model '{self.name}' has no output for label(s) {missing}; "
                f"its pathologies: {[p for p in self.pathologies if p]}"
            )
        return [self.pathologies.index(n) for n in label_names]

    def restricted(self, label_names: list[str]) -> "ModelBundle":
        """A copy whose outputs are exactly `label_names`, in that order (classifier rows sliced).

        Backends then never deal with unused outputs of an 18-label xrv model.
        """
        import copy

        index = self.output_index(label_names)
        if index == list(range(len(self.pathologies))):
            return self
        net = copy.deepcopy(self.net)
        old = net.classifier
        new = nn.Linear(old.in_features, len(index))
        with torch.no_grad():
            new.weight.copy_(old.weight[index])
            new.bias.copy_(old.bias[index])
        net.classifier = new
        return ModelBundle(**{**self.__dict__, "net": net.eval(), "pathologies": list(label_names)})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "architecture": self.architecture, "pathologies": self.pathologies,
            "resolution": self.resolution, "source": self.source, "preprocessing": self.preprocessing,
            "data_fingerprint": self.data_fingerprint,
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }


def build_densenet(arch: dict[str, Any], num_classes: int) -> nn.Module:
    import torchxrayvision as xrv

    net = xrv.models.DenseNet(num_classes=num_classes, in_channels=1, weights=None,
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    net.op_threshs = None
    return net.eval()


def save_checkpoint(bundle: ModelBundle, path: Path, recipe: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": bundle.net.state_dict(),
        "meta": {**{k: v for k, v in asdict(bundle).items() if k != "net"}, "recipe": recipe or {}},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"model checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise SuiteError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from None


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata (labels, resolution, architecture, recipe) without building its
    network, which would import torchxrayvision and torchvision."""
    try:
        return _read_checkpoint(path)["meta"]
    except (KeyError, TypeError) as exc:
        raise SuiteError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from None


def load_checkpoint(path: Path) -> ModelBundle:
    payload = _read_checkpoint(path)
    try:
        meta = payload["meta"]
        net = build_densenet(meta["architecture"], len(meta["pathologies"]))
        net.load_state_dict(payload["state_dict"])
    except SuiteError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise SuiteError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from None
    meta = {k: v for k, v in meta.items() if k != "recipe"}
    return ModelBundle(net=net.eval(), **{**meta, "source": "checkpoint"})


def load_xrv_weights(weights: str) -> ModelBundle:
    """A torchxrayvision pretrained DenseNet from its cache; offline and absent: say where to put it."""
    import os

    import torchxrayvision as xrv

    if weights not in xrv.models.model_urls or not weights.startswith("densenet"):
        names = [k for k in xrv.models.model_urls if k.startswith("densenet")]
        raise unknown("torchxrayvision DenseNet weights", weights, names)
    url = xrv.models.model_urls[weights]["weights_url"]
    local = Path(os.path.expanduser(xrv.utils.get_cache_dir())) / os.path.basename(url)
    if not local.exists():
        raise SuiteError(
            f"weights '{weights}' are not cached and cannot be downloaded offline: "
            f"place {os.path.basename(url)} (from {url}) at {local}"
        )
    net = xrv.models.DenseNet(weights=weights)
    net.op_threshs = None
    return ModelBundle(net=net.eval(), name=f"xrv:{weights}", architecture=DENSENET121,
                       pathologies=list(net.pathologies), resolution=224, source="xrv-weights")


def random_small_densenet(pathologies: list[str], resolution: int, seed: int = 0) -> ModelBundle:
    """The suite's small DenseNet with seeded random weights (fidelity checks, tests, benchmarks)."""
    torch.manual_seed(seed)
    net = build_densenet(SMALL_DENSENET, len(pathologies))
    return ModelBundle(net=net, name="small-densenet-untrained", architecture=SMALL_DENSENET,
                       pathologies=list(pathologies), resolution=resolution, source="random-init")


def random_densenet121(pathologies: list[str], resolution: int) -> ModelBundle:
    net = build_densenet(DENSENET121, len(pathologies))
    return ModelBundle(net=net, name="densenet121-random", architecture=DENSENET121,
                       pathologies=list(pathologies), resolution=resolution, source="random-init")


