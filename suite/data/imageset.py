"""One in-memory container for every dataset the suite evaluates on.

Images use torchxrayvision's convention: float32, one channel, values in
[-1024, 1024], so the same tensors feed xrv models, suite-trained models and every
backend. Labels are 1/0 with NaN where a label is unknown for an image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

XRV_MIN, XRV_MAX = -1024.0, 1024.0


@dataclass
class ImageSet:
    name: str
    images: np.ndarray        # float32 [N, 1, H, W]
    labels: np.ndarray        # float32 [N, L], 1 / 0 / NaN
    label_names: list[str]
    image_ids: np.ndarray     # str [N]
    sites: np.ndarray         # str [N]
    patient_ids: np.ndarray   # str [N]
    splits: np.ndarray        # str [N], 'train' or 'test'

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be [N, 1, H, W], got {self.images.shape}")
        for name in ("labels", "image_ids", "sites", "patient_ids", "splits"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, images have {n}")
        if self.labels.shape[1] != len(self.label_names):
            raise ValueError("labels and label_names disagree on the number of labels")
        if len(set(self.image_ids.tolist())) != n:
            raise ValueError("image_ids must be unique")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, mask_or_index: np.ndarray) -> "ImageSet":
        idx = np.asarray(mask_or_index)
        return ImageSet(
            name=self.name,
            images=self.images[idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            image_ids=self.image_ids[idx],
            sites=self.sites[idx],
            patient_ids=self.patient_ids[idx],
            splits=self.splits[idx],
        )

    def with_labels(self, keep: list[int]) -> "ImageSet":
        """The same images scored on label columns `keep` only (in that order)."""
        return ImageSet(**{**self.__dict__, "labels": self.labels[:, keep],
                           "label_names": [self.label_names[j] for j in keep]})

    def split(self, which: str) -> "ImageSet":
        return self.subset(self.splits == which)

    def site_names(self) -> list[str]:
        return sorted(set(self.sites.tolist()))

    def fingerprint(self) -> str:
        """Content hash: ties checkpoints and cached results to the exact data."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.nan_to_num(self.labels, nan=-1).tobytes())
        h.update("|".join(self.label_names).encode())
        h.update("|".join(self.image_ids.tolist()).encode())
        return h.hexdigest()[:16]


def patient_level_split(patient_ids: np.ndarray, test_fraction: float, seed: int,
                        strata: np.ndarray | None = None) -> np.ndarray:
    """'train'/'test' per row with no patient on both sides, stratified by `strata` (e.g. site)."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(patient_ids), "train", dtype=object)
    strata = strata if strata is not None else np.zeros(len(patient_ids), dtype=object)
    for stratum in sorted(set(strata.tolist())):
        rows = np.flatnonzero(strata == stratum)
        patients = np.array(sorted(set(patient_ids[rows].tolist())))
        rng.shuffle(patients)
        n_test = max(1, int(round(test_fraction * len(patients)))) if len(patients) > 1 else 0
        test_patients = set(patients[:n_test].tolist())
        for r in rows:
            if patient_ids[r] in test_patients:
                splits[r] = "test"
    return splits.astype(str)
