"""A folder of PNG/JPEG/DICOM files plus a CSV: the adapter for a hospital's own export.

CSV columns: `image` (file path relative to the folder), one column per label
(1 / 0 / empty = unknown), and optionally `site` and `patient`. A file that cannot
be decoded is named and either fails the run or is skipped (dataset.on_bad_image).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from suite.config import DatasetConfig
from suite.data.imageset import ImageSet, patient_level_split
from suite.data.preprocess import PREPROCESS_VERSION, BadImage, crop_and_resize, read_any
from suite.errors import SuiteError

LOADER_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12] + "-" + PREPROCESS_VERSION
RESERVED = ("image", "site", "patient")


def read_label_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise SuiteError(f"label file not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SuiteError(f"label file {path} is not a readable CSV: {exc}") from None
    if "image" not in df.columns:
        raise SuiteError(f"label file {path} lacks column 'image' (has: {', '.join(df.columns)})")
    label_cols = [c for c in df.columns if c not in RESERVED]
    if not label_cols:
        raise SuiteError(f"label file {path} has no label columns besides {', '.join(RESERVED)}")
    for c in label_cols:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = df[c].notna() & (values.isna() | ~values.isin([0, 1]))
        if bad.any():
            raise SuiteError(f"label column '{c}' in {path} must hold 1, 0 or nothing; "
                             f"row {int(np.flatnonzero(bad)[0]) + 2} has '{df[c][bad].iloc[0]}'")
    if df["image"].duplicated().any():
        raise SuiteError(f"label file {path} lists image '{df['image'][df['image'].duplicated()].iloc[0]}' twice")
    return df


def load(cfg: DatasetConfig, seed: int, quick: bool = False) -> ImageSet:
    from tqdm import tqdm

    if not cfg.data_dir:
        raise SuiteError("dataset 'folder' needs --data-dir")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise SuiteError(f"--data-dir {root} is not a folder")
    df = read_label_csv(Path(cfg.label_file) if cfg.label_file else root / "labels.csv")
    if cfg.max_images:
        df = df.iloc[: cfg.max_images]
    if df.empty:
        raise SuiteError("dataset 'folder' is empty: the label file lists no images")
    label_cols = [c for c in df.columns if c not in RESERVED]
    size = cfg.resolution or 224
    images, keep, bad = [], [], []
    for i, rel in enumerate(tqdm(df["image"].astype(str), desc="loading images", unit="img", leave=False, disable=None)):
        try:
            images.append(crop_and_resize(read_any(root / rel), size))
            keep.append(i)
        except BadImage as exc:
            if cfg.on_bad_image == "fail":
                raise SuiteError(f"{exc} (set dataset.on_bad_image = \"skip\" to skip such files)") from None
            bad.append(rel)
    if bad:
        print(f"note: skipped {len(bad)} unreadable image(s): {', '.join(bad[:10])}", file=sys.stderr)
    if not keep:
        raise SuiteError(f"dataset 'folder' in {root} has no readable images")
    df = df.iloc[keep].reset_index(drop=True)
    ids = df["image"].astype(str).to_numpy()
    sites = df["site"].astype(str).to_numpy() if "site" in df else np.full(len(df), "site-1")
    patients = df["patient"].astype(str).to_numpy() if "patient" in df else ids
    return ImageSet(
        name="folder", images=np.stack(images),
        labels=df[label_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32),
        label_names=label_cols, image_ids=ids, sites=sites, patient_ids=patients,
        splits=patient_level_split(patients, cfg.test_fraction, seed, strata=sites))
