"""Who owns which data in a run, and the check that the owners' images never mix.

Three roles:
  vendor          the model owner's own training data. It trains the suite's model (the one
                  inference backends serve and every training row starts from or builds on).
                  On the synthetic default it is `VENDOR_SITES`, rendered from their own
                  streams with their own scanners and case mix (a realistic domain shift to
                  the hospitals); on real data it is `--pretrain-dataset NAME[:DATA_DIR]`, or
                  the public sets behind torchxrayvision weights (`--model xrv:<weights>`).
  hospital train  each hospital site's private training split: only training-track rows
                  (dp, fl) touch it, and their privacy claims are about these images.
  test            the hospital sites' held-out images every row is scored on.

A run refuses any image shared by the vendor's data and a hospital split (by id and by
pixel hash, so a re-labelled copy is caught too); `describe` is what run.json records.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from suite.config import DatasetConfig
from suite.data.imageset import ImageSet
from suite.errors import SuiteError

SYNTHETIC_VENDOR = "synthetic-vendor"
# The vendor's archive is 32/21 the size of the hospitals' pooled training split: 4 sites x 800
# = 3,200 on the default's 2,100 (with 2,100 the domain shift left the default model at macro
# AUROC 0.75; 0.80 wanted); small runs and tests get proportionally small vendor sets.
VENDOR_PER_HOSPITAL_IMAGE = 32 / 21
MIN_VENDOR_IMAGES_PER_SITE = 8

# Public sets each torchxrayvision DenseNet was trained on (its weights' names say so).
XRV_TRAINING_SETS = {
    "densenet121-res224-all": ("nih", "padchest", "chexpert", "rsna-pneumonia", "mimic-cxr",
                               "openi", "covid19"),
    "densenet121-res224-nih": ("nih",), "densenet121-res224-pc": ("padchest",),
    "densenet121-res224-chex": ("chexpert",), "densenet121-res224-rsna": ("rsna-pneumonia",),
    "densenet121-res224-mimic_nb": ("mimic-cxr",), "densenet121-res224-mimic_ch": ("mimic-cxr",),
}


def vendor_spec(cfg: DatasetConfig) -> str:
    """The vendor's dataset for this run: `pretrain_dataset`, or the synthetic vendor sites
    when the hospital data is synthetic; real hospital data needs an explicit choice."""
    if cfg.pretrain_dataset:
        return cfg.pretrain_dataset
    if cfg.name == "synthetic":
        return SYNTHETIC_VENDOR
    raise SuiteError(
        f"dataset '{cfg.name}': the suite's model must be trained on the vendor's own data, never "
        "on the hospital's; give --pretrain-dataset NAME[:DATA_DIR] (a separate dataset), "
        "--model xrv:<weights> (pretrained; must already be in the torchxrayvision cache "
        "offline) or --model <checkpoint.pt> trained elsewhere")


def load_vendor_data(cfg: DatasetConfig, hospital: ImageSet, seed: int, quick: bool) -> ImageSet:
    """The vendor's training images, every one marked 'train', with the hospital's labels."""
    spec = vendor_spec(cfg)
    if spec == SYNTHETIC_VENDOR:
        from suite.data.synthetic import generate_vendor_synthetic

        vendor = generate_vendor_synthetic(n_per_site=synthetic_vendor_per_site(hospital),
                                           size=hospital.resolution, seed=seed)
    else:
        from suite.data.catalog import load_dataset

        name, _, data_dir = spec.partition(":")
        if name == cfg.name and (data_dir or None) == cfg.data_dir:
            raise SuiteError(f"--pretrain-dataset '{spec}' is the hospital dataset itself; the "
                             "vendor's data must be a separate dataset")
        vcfg = dataclasses.replace(DatasetConfig(), name=name, data_dir=data_dir or None,
                                   resolution=hospital.resolution, views=cfg.views,
                                   on_bad_image=cfg.on_bad_image)
        vendor, _ = load_dataset(vcfg, seed, quick)
        vendor = ImageSet(**{**vendor.__dict__, "splits": np.full(len(vendor), "train")})
    missing = [n for n in hospital.label_names if n not in vendor.label_names]
    if missing:
        raise SuiteError(f"vendor dataset '{spec}' has no label(s) {missing} the hospital data scores")
    return vendor.with_labels([vendor.label_names.index(n) for n in hospital.label_names])


def synthetic_vendor_per_site(hospital: ImageSet) -> int:
    """Vendor images per vendor site for a hospital set of this size (800 on the default)."""
    from suite.data.synthetic import VENDOR_SITES

    n_train = int((hospital.splits == "train").sum())
    return max(MIN_VENDOR_IMAGES_PER_SITE,
               round(VENDOR_PER_HOSPITAL_IMAGE * n_train / len(VENDOR_SITES)))


def image_hashes(data: ImageSet) -> list[str]:
    """A content hash per image (pixels only), so a copy under another id is still caught."""
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:20] for x in data.images]


def check_disjoint(vendor_ids, vendor_hashes, hospital: ImageSet,
                   splits: tuple[str, ...] = ("train", "test"), source: str = "the vendor's data") -> None:
    """Refuse a run whose vendor images reappear in a hospital split (by id or by pixels)."""
    for split in splits:
        part = hospital.split(split)
        by_id = set(map(str, vendor_ids)) & set(part.image_ids.astype(str).tolist())
        by_pixels = set(vendor_hashes or ()) & set(image_hashes(part)) if vendor_hashes else set()
        if by_id or by_pixels:
            n = len(by_id) or len(by_pixels)
            example = sorted(by_id)[0] if by_id else "(identical pixels under another id)"
            raise SuiteError(
                f"{source} shares {n} image(s) with the hospitals' {split} split (e.g. {example}): "
                "the vendor's model must never have seen a hospital's images; use a separate "
                "dataset (--pretrain-dataset) or a checkpoint trained elsewhere")


def check_xrv_weights(weights: str, hospital_dataset: str) -> tuple[str, ...]:
    """Public sets behind xrv weights; refuse weights trained on the hospital dataset itself
    (image-level checks are impossible: the weights carry no image list)."""
    sets = XRV_TRAINING_SETS.get(weights, ())
    shared = [d for d in hospital_dataset.split("+") if d in sets]
    if shared:
        raise SuiteError(
            f"torchxrayvision weights '{weights}' were trained on {', '.join(shared)}, the "
            "hospital dataset of this run: the vendor's model would have seen hospital images; "
            "pick weights trained on other sets")
    return sets


def split_counts(data: ImageSet, split: str) -> dict:
    part = data.split(split)
    sites, counts = np.unique(part.sites.astype(str), return_counts=True)
    return {"n_images": int(len(part)), "n_patients": int(len(set(part.patient_ids.tolist()))),
            "per_site": {str(s): int(c) for s, c in zip(sites, counts)}}


def describe(hospital: ImageSet, vendor: dict, checked_splits: tuple[str, ...]) -> dict:
    """run.json's `data_roles`: who owns which images, how many, and what was checked."""
    return {
        "vendor": {"owner": "model owner (vendor)",
                   "trains": "the suite's model: served by inference rows, backbone or starting "
                             "point of training rows", **vendor},
        "hospital_train": {"owner": "each hospital site, privately",
                           "used_by": "training-track rows only (their privacy claims cover these "
                                      "images)", **split_counts(hospital, "train")},
        "test": {"owner": "hospital sites (held out, scored)", **split_counts(hospital, "test")},
        "disjoint_from_vendor": list(checked_splits),
    }
