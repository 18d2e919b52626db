"""The dp rows' backbone-feature cache: a cached tensor is the recomputed one, and new
backbone weights or other images never hit an old entry."""

import numpy as np
import torch

from backends.dp.backend import backbone_features
from suite.models import random_small_densenet


def _images(seed, n=6):
    return np.random.default_rng(seed).normal(0, 300, (n, 1, 32, 32)).astype(np.float32)


def test_cache_returns_what_recomputing_gives(tmp_path):
    net = random_small_densenet(["a", "b"], 32, seed=0).net
    x = _images(0)
    first = backbone_features(net, x, tmp_path)
    assert len(list((tmp_path / "dp-features").glob("*.pt"))) == 1
    again = backbone_features(net, x, tmp_path)                  # from the cache
    assert torch.equal(first, again)
    assert torch.allclose(again, backbone_features(net, x, None))   # uncached computation


def test_other_weights_or_images_miss_the_cache(tmp_path):
    net = random_small_densenet(["a", "b"], 32, seed=0).net
    x = _images(0)
    backbone_features(net, x, tmp_path)
    backbone_features(net, _images(1), tmp_path)                  # other images
    other = random_small_densenet(["a", "b"], 32, seed=1).net     # other backbone weights
    from_other = backbone_features(other, x, tmp_path)
    assert len(list((tmp_path / "dp-features").glob("*.pt"))) == 3
    assert torch.allclose(from_other, backbone_features(other, x, None))
    # positive control: the head is not part of the key (it is what DP trains), the backbone is
    with torch.no_grad():
        net.classifier.weight.add_(1.0)
    backbone_features(net, x, tmp_path)
    assert len(list((tmp_path / "dp-features").glob("*.pt"))) == 3


def test_torn_cache_file_is_recomputed(tmp_path):
    net = random_small_densenet(["a", "b"], 32, seed=0).net
    x = _images(0)
    good = backbone_features(net, x, tmp_path)
    (path,) = (tmp_path / "dp-features").glob("*.pt")
    path.write_bytes(b"torn")
    assert torch.allclose(backbone_features(net, x, tmp_path), good)
