"""Dataset registry and on-disk cache of prepared datasets.

Every loader turns a DatasetConfig into an ImageSet; the prepared set is cached as
.npz so backend worker processes load exactly the same arrays the parent saw. The cache
key covers the files the set is built from (every file's size and modification time,
label files by content), so an edited label or image is never served from a stale cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from suite.config import DatasetConfig
from suite.data.imageset import ImageSet
from suite.errors import SuiteError
from suite.hashing import cache_key
from suite.paths import dataset_cache_dir
from suite.registry import Registry

DATASETS: Registry = Registry("dataset")
DATASETS.register("synthetic", "suite.data.synthetic_loader:load")
DATASETS.register("folder", "suite.data.folder:load")
for _name in ("nih", "chexpert", "padchest", "rsna-pneumonia", "mimic-cxr", "openi", "covid19"):
    DATASETS.register(_name, "suite.data.xrv_sets:load")


def _registered_name(name: str) -> str:
    """'nih+chexpert' is served by the xrv adapter; each part must be known."""
    parts = name.split("+")
    for part in parts:
        DATASETS.target(part)
    if len(parts) > 1 and any(DATASETS.target(p) != DATASETS.target(parts[0]) for p in parts):
        raise SuiteError(f"only torchxrayvision sets combine with '+': {name}")
    return parts[0]


def load_dataset(cfg: DatasetConfig, seed: int, quick: bool = False) -> tuple[ImageSet, Path]:
    """The prepared ImageSet and its cache file (built on first use)."""
    registered = _registered_name(cfg.name)  # unknown name: fail before any work
    data, path = _load_train_test(cfg, registered, seed, quick)
    if cfg.split == "all":
        return every_image_as_test(data, path)
    return data, path


def every_image_as_test(data: ImageSet, path: Path) -> tuple[ImageSet, Path]:
    """Validate mode: a model trained elsewhere is scored on every image; sites are kept."""
    everything = dataclasses.replace(data, splits=np.full(len(data), "test", dtype=object))
    all_path = path.with_name(path.stem + "-all.npz")
    if not all_path.exists():
        save_npz(everything, all_path)
    return everything, all_path


def _load_train_test(cfg: DatasetConfig, registered: str, seed: int,
                     quick: bool) -> tuple[ImageSet, Path]:
    # the split mode is not in the key: "all" relabels the very same prepared set
    key = cache_key({k: v for k, v in dataclasses.asdict(cfg).items() if k != "split"}, seed, quick,
                    _loader_version(registered), source_fingerprint(cfg))
    path = dataset_cache_dir() / f"{cfg.name.replace('+', '_')}-{key}.npz"
    if path.exists():
        try:
            return load_npz(path), path
        except Exception:
            path.unlink(missing_ok=True)  # torn cache file: rebuild
    loader = DATASETS.load(registered)
    data = loader(cfg, seed=seed, quick=quick)
    if len(data) == 0:
        raise SuiteError(f"dataset '{cfg.name}' is empty")
    for split in ("train", "test"):
        if not (data.splits == split).any():
            raise SuiteError(f"dataset '{cfg.name}' has no '{split}' images")
    save_npz(data, path)
    return data, path


LABEL_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".json")


def source_fingerprint(cfg: DatasetConfig) -> str:
    """What the prepared set is built from: size and mtime of every file under each data
    folder, and the content of every label file (given, or lying in a data folder)."""
    h = hashlib.sha256()
    labels = [Path(p) for part in (cfg.label_file or "").split(",") for p in part.split(";") if p]
    for d in [Path(p) for p in (cfg.data_dir or "").split(",") if p]:
        if not d.is_dir():
            continue   # the loader names the missing folder
        for root, dirs, files in os.walk(d):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                h.update(f"{path.relative_to(d)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                if root == str(d) and name.lower().endswith(LABEL_SUFFIXES):
                    labels.append(path)
    for path in labels:
        h.update(str(path).encode())
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(b"(unreadable)")
    return h.hexdigest()[:16]


def _loader_version(name: str) -> str:
    module = DATASETS.load(name).__module__
    import sys

    return str(getattr(sys.modules[module], "LOADER_VERSION", "1"))


def save_npz(data: ImageSet, path: Path) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp, name=np.array(data.name), images=data.images, labels=data.labels,
        label_names=np.array(data.label_names), image_ids=data.image_ids.astype(str),
        sites=data.sites.astype(str), patient_ids=data.patient_ids.astype(str),
        splits=data.splits.astype(str),
    )
    tmp.replace(path)


def load_npz(path: Path) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        return ImageSet(
            name=str(z["name"]), images=z["images"], labels=z["labels"],
            label_names=[str(x) for x in z["label_names"]], image_ids=z["image_ids"],
            sites=z["sites"], patient_ids=z["patient_ids"], splits=z["splits"],
        )
