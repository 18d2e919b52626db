"""The synthetic phantom set: deterministic, well-formed, multi-site, and findings that show."""

from __future__ import annotations

import re

import numpy as np
import pytest

from suite.data import synthetic
from suite.data.synthetic import LABELS, N_SITES, generate_synthetic

SIZE = 64


@pytest.fixture(scope="module")
def small():
    return generate_synthetic(n_train_per_site=40, n_test_per_site=20, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def clean_site():
    """Many images from the sharp, clean reference site, for population-level contrasts."""
    return generate_synthetic(n_train_per_site=400, n_test_per_site=0, size=SIZE, seed=3, n_sites=1)


def _region(u_low, u_high, v_low, v_high, size=SIZE):
    """Boolean [H, W] mask of pixels whose normalised centre lies in the box."""
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    rows = (centres >= v_low) & (centres <= v_high)
    cols = (centres >= u_low) & (centres <= u_high)
    return rows[:, None] & cols[None, :]


def _label(dataset, name):
    return dataset.labels[:, LABELS.index(name)] > 0


# ---------------------------------------------------------------- determinism and format

def test_same_arguments_give_bit_identical_data():
    first = generate_synthetic(n_train_per_site=6, n_test_per_site=3, size=32, seed=11)
    second = generate_synthetic(n_train_per_site=6, n_test_per_site=3, size=32, seed=11)
    assert first.images.tobytes() == second.images.tobytes()
    assert first.labels.tobytes() == second.labels.tobytes()
    assert first.fingerprint() == second.fingerprint()


def test_different_seeds_give_different_images():
    first = generate_synthetic(n_train_per_site=6, n_test_per_site=3, size=32, seed=1)
    second = generate_synthetic(n_train_per_site=6, n_test_per_site=3, size=32, seed=2)
    assert not np.array_equal(first.images, second.images)
    assert first.fingerprint() != second.fingerprint()


def test_a_site_does_not_depend_on_how_many_sites_are_generated():
    two = generate_synthetic(n_train_per_site=5, n_test_per_site=2, size=32, seed=4, n_sites=2)
    seven = generate_synthetic(n_train_per_site=5, n_test_per_site=2, size=32, seed=4)
    assert np.array_equal(two.images, seven.images[: len(two)])


def test_images_labels_and_ids_are_well_formed(small):
    n = N_SITES * 60
    assert small.name == "synthetic"
    assert small.images.shape == (n, 1, SIZE, SIZE) and small.images.dtype == np.float32
    assert small.images.min() >= -1024.0 and small.images.max() <= 1024.0
    assert small.images.std() > 100.0, "images should use a good part of the xrv range"
    assert small.labels.shape == (n, len(LABELS)) and small.labels.dtype == np.float32
    assert set(np.unique(small.labels).tolist()) == {0.0, 1.0}
    assert small.label_names == LABELS
    assert all(re.fullmatch(r"synth-s[1-7]-\d{6}", i) for i in small.image_ids)
    assert len(set(small.patient_ids.tolist())) == n


def test_large_images_render():
    data = generate_synthetic(n_train_per_site=2, n_test_per_site=1, size=224, seed=0, n_sites=1)
    assert data.images.shape == (3, 1, 224, 224)
    assert np.isfinite(data.images).all()


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="n_sites"):
        generate_synthetic(n_train_per_site=1, n_test_per_site=1, n_sites=8)
    with pytest.raises(ValueError, match="size"):
        generate_synthetic(n_train_per_site=1, n_test_per_site=1, size=8)


# ---------------------------------------------------------------- sites and splits

def test_every_site_has_its_train_and_test_images(small):
    assert small.site_names() == [f"site-{i}" for i in range(1, N_SITES + 1)]
    for site in small.site_names():
        splits = small.splits[small.sites == site]
        assert (splits == "train").sum() == 40 and (splits == "test").sum() == 20


def test_each_label_has_positives_and_negatives_in_each_split(small):
    for split in ("train", "test"):
        labels = small.split(split).labels
        assert (labels.sum(axis=0) > 0).all(), f"a label has no positives in {split}"
        assert ((1 - labels).sum(axis=0) > 0).all(), f"a label has no negatives in {split}"


def _pixel_noise(images):
    """Std of the difference of horizontal neighbours in the flat abdomen below the lungs."""
    box = _region(-0.5, 0.5, 0.75, 0.95)
    band = images[:, 0][:, box.any(axis=1)][:, :, box.any(axis=0)]
    return float(np.diff(band, axis=-1).std() / np.sqrt(2))


def _site_statistics(data):
    """Per site: (detector noise, contrast between lung field and abdomen)."""
    lung = _region(-0.65, -0.35, -0.3, 0.1) | _region(0.35, 0.65, -0.3, 0.1)
    abdomen = _region(-0.4, 0.4, 0.7, 0.95)
    stats = {}
    for site in data.site_names():
        images = data.images[data.sites == site]
        contrast = images[:, 0][:, abdomen].mean() - images[:, 0][:, lung].mean()
        stats[site] = (_pixel_noise(images), float(contrast))
    return stats


def test_sites_acquire_measurably_differently(small):
    stats = _site_statistics(small)
    noise = {site: s[0] for site, s in stats.items()}
    contrast = {site: s[1] for site, s in stats.items()}
    assert noise["site-3"] > 2.5 * noise["site-1"], "the portable site should be much noisier"
    assert noise["site-7"] > 2.0 * noise["site-1"]
    assert contrast["site-2"] < 0.85 * contrast["site-1"], "site-2 is the low-contrast site"
    assert contrast["site-6"] > 1.15 * contrast["site-1"], "site-6 is the high-contrast site"
    profiles = np.array([[n / 10.0, c / 100.0] for n, c in stats.values()])
    gaps = np.abs(profiles[:, None] - profiles[None, :]).max(axis=-1)
    assert gaps[~np.eye(len(profiles), dtype=bool)].min() > 0.2, "two sites look alike"


def test_low_resolution_sites_spread_a_point_more():
    def spread(site_name):
        site = next(s for s in synthetic.SITES if s.name == site_name)
        row = synthetic._acquisition_operator(site, SIZE)[SIZE // 2]
        offsets = np.arange(SIZE) - SIZE // 2
        return float(np.sqrt((row * offsets ** 2).sum() / row.sum()))
    assert spread("site-4") > 2 * spread("site-1")
    assert spread("site-7") > 2 * spread("site-1")


# ---------------------------------------------------------------- findings in the pixels

def test_effusion_brightens_the_lung_bases(clean_site):
    bases = _region(-0.75, -0.45, 0.2, 0.45) | _region(0.45, 0.75, 0.2, 0.45)
    apices = _region(-0.6, -0.3, -0.6, -0.3) | _region(0.3, 0.6, -0.6, -0.3)
    images = clean_site.images[:, 0]
    # bases relative to apices of the same image, so exposure differences cancel
    base_over_apex = images[:, bases].mean(axis=1) - images[:, apices].mean(axis=1)
    effusion = _label(clean_site, "Effusion")
    assert base_over_apex[effusion].mean() - base_over_apex[~effusion].mean() > 25.0


def test_cardiomegaly_widens_the_heart(clean_site):
    heart_rows = _region(-0.75, 0.75, 0.1, 0.3)
    # effusion and consolidation also whiten this band, so compare hearts without them
    others_clear = ~_label(clean_site, "Effusion") & ~_label(clean_site, "Consolidation")
    bright = clean_site.images[:, 0] > 0.0
    width = (bright & heart_rows).sum(axis=(1, 2)) / heart_rows.any(axis=1).sum()
    enlarged = _label(clean_site, "Cardiomegaly")
    wide, normal = width[enlarged & others_clear], width[~enlarged & others_clear]
    assert wide.mean() > normal.mean() + 2.0, "hearts should be several pixels wider"
    assert np.percentile(wide, 10) < np.percentile(normal, 90), "the two groups must overlap"


def _render_with(finding: str, value: float, n: int = 64, size: int = SIZE):
    """Ideal phantoms of the same patients with one finding forced on or off.

    Every draw happens whatever the labels, so both calls see identical anatomy and noise.
    """
    labels = np.zeros((n, len(LABELS)), dtype=np.float32)
    labels[:, LABELS.index(finding)] = value
    cases = synthetic._draw_cases(np.random.default_rng(0), labels)
    if finding == "Cardiomegaly":
        cases["ctr"] = np.full(n, 0.58 if value else 0.44)
    grid = synthetic._pixel_centres(size)
    return synthetic._render_phantom(np.random.default_rng(1), grid, cases)


@pytest.fixture(scope="module")
def counterfactuals():
    return {name: _render_with(name, 1.0) - _render_with(name, 0.0) for name in LABELS}


def test_opacities_only_add_density(counterfactuals):
    for name in ("Effusion", "Nodule", "Consolidation", "Cardiomegaly"):
        change = counterfactuals[name]
        assert change.min() > -1e-3, f"{name} darkened some pixels"
        # a few findings hide behind the heart, as on real films
        assert (change.reshape(len(change), -1).max(axis=1) > 0.08).mean() > 0.8, name


def test_nodule_is_small_and_consolidation_is_larger(counterfactuals):
    def affected_fraction(name):
        return (counterfactuals[name] > 0.03).mean(axis=(1, 2))
    nodule, consolidation = affected_fraction("Nodule"), affected_fraction("Consolidation")
    assert np.median(nodule) < 0.02
    assert np.median(consolidation) > 2 * np.median(nodule)


def test_effusion_sits_low_in_the_chest(counterfactuals):
    change = counterfactuals["Effusion"]
    upper, lower = change[:, : SIZE // 2].sum(), change[:, SIZE // 2:].sum()
    assert lower > 5 * upper


def test_pneumothorax_is_a_lucent_rim_near_the_apex_or_side(counterfactuals):
    change = counterfactuals["Pneumothorax"]
    darker = change < -0.03
    assert darker.reshape(len(change), -1).any(axis=1).mean() > 0.9
    rows = np.nonzero(darker)[1]
    assert np.median(rows) < SIZE * 0.55, "the lucent rim should be apical or lateral, not basal"


def test_cardiothoracic_ratios_of_normal_and_enlarged_hearts_overlap():
    rng = np.random.default_rng(0)
    labels = np.zeros((4000, len(LABELS)), dtype=np.float32)
    labels[::2, 0] = 1.0
    ctr = synthetic._draw_severities(rng, labels)["ctr"]
    enlarged, normal = ctr[::2], ctr[1::2]
    assert 0.42 <= normal.mean() <= 0.48 and enlarged.mean() > 0.5
    assert (enlarged < np.percentile(normal, 95)).mean() > 0.05


# ------------------------------------------------------------------ the vendor's own sites

def test_vendor_sites_are_their_own_images_with_their_own_acquisition():
    from suite.data.roles import image_hashes
    from suite.data.synthetic import VENDOR_SITES, generate_vendor_synthetic

    hospital = generate_synthetic(n_train_per_site=20, n_test_per_site=5, size=SIZE)
    vendor = generate_vendor_synthetic(n_per_site=20, size=SIZE)
    again = generate_vendor_synthetic(n_per_site=20, size=SIZE)
    assert np.array_equal(vendor.images, again.images)
    assert (vendor.splits == "train").all() and vendor.site_names() == [s.name for s in VENDOR_SITES]
    assert not set(vendor.image_ids) & set(hospital.image_ids)
    assert not set(vendor.patient_ids) & set(hospital.patient_ids)
    assert not set(image_hashes(vendor)) & set(image_hashes(hospital))
    # a domain shift: no vendor site acquires like any hospital site
    stats = lambda d, s: np.array([d.images[d.sites == s].mean(), d.images[d.sites == s].std(),  # noqa: E731
                                   _pixel_noise(d.images[d.sites == s])])
    for v in vendor.site_names():
        for h in hospital.site_names():
            assert np.abs(stats(vendor, v) - stats(hospital, h)).max() > 1.0, (v, h)
