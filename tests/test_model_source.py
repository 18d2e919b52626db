"""The default model is a function of its recipe and data alone."""

from __future__ import annotations

import torch

from suite.data.synthetic import generate_synthetic
from suite.model_source import train_small_densenet
from suite.training import Recipe


def _weights(bundle) -> list[torch.Tensor]:
    return [v.detach().clone() for v in bundle.net.state_dict().values()]


def test_training_does_not_depend_on_earlier_random_draws():
    # whatever consumed the global RNG before (an import, another model) must not change the
    # initial weights: three fresh runs once trained models at 0.769 / 0.791 / 0.797 AUROC
    data = generate_synthetic(n_train_per_site=6, n_test_per_site=1, size=32, n_sites=2)
    recipe = Recipe(epochs=1, batch_size=8, lr=3e-3, seed=0)
    torch.manual_seed(1)
    first = _weights(train_small_densenet(data, recipe))
    torch.rand(12345)
    second = _weights(train_small_densenet(data, recipe))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------ data roles: vendor vs hospitals

def test_default_model_trains_on_vendor_images_only(tiny_data):
    from suite.config import ModelConfig
    from suite.data.roles import describe
    from suite.model_source import check_vendor_disjoint, vendor_description, vendor_model

    bundle, ref = vendor_model(ModelConfig(epochs=1), tiny_data, seed=0, quick=True)
    trained = bundle.extra["train_image_ids"]
    assert bundle.extra["data_role"] == "vendor" and ref["kind"] == "checkpoint"
    assert trained and all(i.startswith("synth-vendor-") for i in trained)
    assert not set(trained) & set(tiny_data.image_ids.tolist())
    assert set(bundle.extra["train_sites"]) == {"vendor-1", "vendor-2", "vendor-3", "vendor-4"}
    check_vendor_disjoint(bundle, tiny_data, ("train", "test"))        # passes
    roles = describe(tiny_data, vendor_description(bundle), ("train", "test"))
    assert roles["vendor"]["n_images"] == len(trained)
    assert roles["hospital_train"]["n_images"] == int((tiny_data.splits == "train").sum())
    assert roles["test"]["n_images"] == int((tiny_data.splits == "test").sum())
    assert set(roles["hospital_train"]["per_site"]) == set(tiny_data.site_names())


def test_a_model_trained_on_a_hospital_split_is_refused(tiny_data):
    """Positive control: the old default (trained on the hospitals' training split)."""
    import pytest

    from suite.errors import SuiteError
    from suite.model_source import check_vendor_disjoint

    old = train_small_densenet(tiny_data, Recipe(epochs=1, batch_size=32, seed=0))
    with pytest.raises(SuiteError, match="train split"):
        check_vendor_disjoint(old, tiny_data, ("train", "test"))
    check_vendor_disjoint(old, tiny_data, ("test",))     # inference-only runs never use train


def test_a_copy_under_another_id_is_caught_by_its_pixels(tiny_data):
    import pytest

    from suite.data.roles import check_disjoint, image_hashes
    from suite.errors import SuiteError

    test = tiny_data.split("test")
    with pytest.raises(SuiteError, match="identical pixels"):
        check_disjoint(["renamed-0", "renamed-1"], image_hashes(test)[:2], tiny_data)


def test_real_data_needs_the_vendors_own_data():
    import pytest

    from suite.config import DatasetConfig
    from suite.data.roles import check_xrv_weights, vendor_spec
    from suite.errors import SuiteError

    with pytest.raises(SuiteError, match="--pretrain-dataset"):
        vendor_spec(DatasetConfig(name="nih", data_dir="/x"))
    assert vendor_spec(DatasetConfig(name="nih", pretrain_dataset="chexpert:/y")) == "chexpert:/y"
    with pytest.raises(SuiteError, match="trained on nih"):
        check_xrv_weights("densenet121-res224-nih", "nih")
    assert "chexpert" in check_xrv_weights("densenet121-res224-chex", "nih")
