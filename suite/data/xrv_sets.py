"""Adapters over torchxrayvision's dataset classes for the public chest X-ray sets.

`--dataset nih --data-dir IMAGES [--label-file CSV]`; several sets at once as
`--dataset nih+chexpert --data-dir DIR1,DIR2`, each set becoming one site, as in a
multi-institution study. Images go through xrv's own normalisation, centre crop and
resizer, so pretrained xrv weights see exactly what they were trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from suite.config import DatasetConfig
from suite.data.imageset import ImageSet, patient_level_split
from suite.data.preprocess import PREPROCESS_VERSION
from suite.errors import SuiteError, unknown

LOADER_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12] + "-" + PREPROCESS_VERSION
DEFAULT_VIEWS = ["PA", "AP"]


@dataclass(frozen=True)
class XrvSet:
    cls: str                        # torchxrayvision.datasets class name
    label_kw: tuple[str, ...]       # keyword(s) of the label file(s); () = xrv ships them
    label_default: tuple[str, ...]  # file names looked for in --data-dir when no --label-file
    image_id: Callable[[Any], Any]  # csv -> image id column
    patient_id: Callable[[Any], Any] | None
    extra: tuple[tuple[str, Any], ...] = ()
    ids_are_files: bool = False     # image ids are file names directly in --data-dir


def _col(name):
    return lambda csv: csv[name].astype(str)


XRV_SETS: dict[str, XrvSet] = {
    "nih": XrvSet("NIH_Dataset", ("csvpath",), ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"),
                  _col("Image Index"), _col("Patient ID"), (("unique_patients", False),), True),
    "chexpert": XrvSet("CheX_Dataset", ("csvpath",), ("train.csv",), _col("Path"), _col("patientid"),
                       (("unique_patients", False),)),
    "padchest": XrvSet("PC_Dataset", ("csvpath",),
                       ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",),
                       _col("ImageID"), _col("PatientID"), (("unique_patients", False),)),
    "rsna-pneumonia": XrvSet("RSNA_Pneumonia_Dataset", ("csvpath",), ("stage_2_train_labels.csv",),
                             _col("patientId"), _col("patientId")),
    "mimic-cxr": XrvSet("MIMIC_Dataset", ("csvpath", "metacsvpath"),
                        ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz"),
                        _col("dicom_id"), _col("subject_id"), (("unique_patients", False),)),
    "openi": XrvSet("Openi_Dataset", (), (), _col("imageid"), None, (("unique_patients", False),)),
    "covid19": XrvSet("COVID19_Dataset", ("csvpath",), ("metadata.csv",), _col("filename"),
                      _col("patientid")),
}


def _label_files(spec: XrvSet, data_dir: Path, label_file: str | None) -> dict[str, str]:
    """Label file keyword arguments: given ones, or found in the data folder, or xrv's own."""
    if not spec.label_kw:
        return {}
    given = [p for p in (label_file or "").split(";") if p]
    if given:
        if len(given) != len(spec.label_kw):
            raise SuiteError(f"{spec.cls} needs {len(spec.label_kw)} label file(s) "
                             f"({', '.join(spec.label_kw)}), separated by ';'")
        paths = [Path(p) for p in given]
    else:
        paths = [data_dir / name for name in spec.label_default]
        if len(spec.label_kw) == 1:   # one label file, known under several names: the first found
            paths = [p for p in paths if p.exists()][:1] or paths
        if not all(p.exists() for p in paths):
            if spec.cls in ("NIH_Dataset", "CheX_Dataset", "PC_Dataset", "RSNA_Pneumonia_Dataset"):
                return {}  # xrv ships these label files
            raise SuiteError(f"{spec.cls} needs its label file(s) {list(spec.label_default)}: "
                             f"put them in {data_dir} or pass --label-file")
    for p in paths:
        if not p.exists():
            raise SuiteError(f"label file not found: {p}")
    return {kw: str(p) for kw, p in zip(spec.label_kw, paths)}


def open_xrv(name: str, data_dir: Path, label_file: str | None, views: list[str], seed: int):
    import torchxrayvision as xrv

    spec = XRV_SETS[name]
    if not data_dir.is_dir():
        raise SuiteError(f"--data-dir {data_dir} is not a folder")
    labels = _label_files(spec, data_dir, label_file)
    kwargs = {"imgpath": str(data_dir), "views": views, "seed": seed, **labels, **dict(spec.extra)}
    try:
        ds = getattr(xrv.datasets, spec.cls)(**kwargs)
        ds.suite_label_source = labels.get("csvpath", "torchxrayvision's bundled label file")
        return ds
    except KeyError as exc:
        raise SuiteError(f"label file for '{name}' lacks column {exc}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise SuiteError(f"cannot open '{name}' in {data_dir}: {exc}") from None


def read_images(ds, size: int, ids: np.ndarray, on_bad: str, progress: bool = True):
    """Decode every image through xrv's own __getitem__ (normalise) plus crop and resize."""
    from tqdm import tqdm

    from suite.data.preprocess import crop_and_resize

    images, keep, bad = [], [], []
    for i in tqdm(range(len(ds)), desc="loading images", unit="img", disable=None if progress else True, leave=False):
        try:
            img = ds[i]["img"]
        except Exception as exc:  # noqa: BLE001 - a corrupt file of any kind
            if on_bad == "fail":
                raise SuiteError(f"cannot decode image {ids[i]}: {type(exc).__name__}: {exc}") from None
            bad.append(str(ids[i]))
            continue
        images.append(crop_and_resize(img[0], size))
        keep.append(i)
    return images, np.array(keep, dtype=int), bad


def load_one(name: str, cfg: DatasetConfig, data_dir: Path, label_file: str | None, seed: int,
             size: int) -> tuple[ImageSet, list[str]]:
    ds = open_xrv(name, data_dir, label_file, cfg.views or DEFAULT_VIEWS, seed)
    spec = XRV_SETS[name]
    n = len(ds) if not cfg.max_images else min(len(ds), cfg.max_images)
    csv = ds.csv.iloc[:n]
    ids = spec.image_id(csv).to_numpy()
    if spec.ids_are_files:
        check_images_present(ids, data_dir, getattr(ds, "suite_label_source", "the label file"),
                             cfg.on_bad_image)
    patients = spec.patient_id(csv).to_numpy() if spec.patient_id else ids
    sub = _Head(ds, n)
    images, keep, bad = read_images(sub, size, ids, cfg.on_bad_image)
    if not images:
        raise SuiteError(f"dataset '{name}' in {data_dir} has no readable images")
    labels = np.asarray(ds.labels[:n], dtype=np.float32)[keep]
    site = np.array([name] * len(keep))
    data = ImageSet(name=name, images=np.stack(images), labels=labels,
                    label_names=list(ds.pathologies), image_ids=np.array([f"{name}:{i}" for i in ids[keep]]),
                    sites=site, patient_ids=np.array([f"{name}:{p}" for p in patients[keep]]),
                    splits=np.full(len(keep), "train"))
    return data, bad


def check_images_present(ids: np.ndarray, data_dir: Path, label_source: str, on_bad: str) -> None:
    """The listed images must be in --data-dir; say so with counts (and where they are, when
    --data-dir is the folder above images/), instead of failing on the first missing file."""
    listed = len(ids)
    found = sum((data_dir / str(i)).is_file() for i in ids)
    if found == listed or (found and on_bad == "skip"):
        return
    hint = ""
    below = data_dir / "images"
    if below.is_dir():
        in_below = sum((below / str(i)).is_file() for i in ids)
        if in_below:
            hint = f"; {in_below} of them are in {below}: pass --data-dir {below}"
    if found == 0:
        raise SuiteError(f"none of the images listed in {label_source} are in {data_dir} "
                         f"(listed {listed}, found 0){hint}")
    raise SuiteError(f"only {found} of the {listed} images listed in {label_source} are in {data_dir}"
                     f"{hint or '; pass --label-file with the label CSV of these images'} "
                     f"(or set dataset.on_bad_image = \"skip\")")


class _Head:
    """The first n items of an xrv dataset (for --max-images / quick looks)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def merge(sets: list[ImageSet]) -> ImageSet:
    """Pool several sets; a label one set lacks is unknown (NaN) for its images, not negative."""
    names = sorted({n for s in sets for n in s.label_names if n})
    labels = []
    for s in sets:
        block = np.full((len(s), len(names)), np.nan, dtype=np.float32)
        for j, n in enumerate(s.label_names):
            if n:
                block[:, names.index(n)] = s.labels[:, j]
        labels.append(block)
    return ImageSet(name="+".join(s.name for s in sets), images=np.concatenate([s.images for s in sets]),
                    labels=np.concatenate(labels), label_names=names,
                    image_ids=np.concatenate([s.image_ids for s in sets]),
                    sites=np.concatenate([s.sites for s in sets]),
                    patient_ids=np.concatenate([s.patient_ids for s in sets]),
                    splits=np.concatenate([s.splits for s in sets]))


def drop_empty_labels(data: ImageSet) -> ImageSet:
    """Labels with no positive or no negative anywhere cannot be scored: drop them, loudly."""
    keep = [j for j in range(len(data.label_names))
            if np.nansum(data.labels[:, j]) > 0 and np.nansum(1 - data.labels[:, j]) > 0]
    dropped = [data.label_names[j] for j in range(len(data.label_names)) if j not in keep]
    if dropped:
        import sys

        print(f"note: labels without both classes are not scored: {', '.join(dropped)}", file=sys.stderr)
    return data.with_labels(keep)


def load(cfg: DatasetConfig, seed: int, quick: bool = False) -> ImageSet:
    names = cfg.name.split("+")
    for n in names:
        if n not in XRV_SETS:
            raise unknown("dataset", n, list(XRV_SETS) + ["synthetic", "folder"])
    if not cfg.data_dir:
        raise SuiteError(f"dataset '{cfg.name}' needs --data-dir (the folder of its images)")
    dirs = [Path(d) for d in cfg.data_dir.split(",")]
    labels = (cfg.label_file or "").split(",") if cfg.label_file else [None] * len(names)
    if len(dirs) != len(names) or len(labels) != len(names):
        raise SuiteError(f"give one --data-dir (and --label-file) per dataset, comma-separated: {names}")
    size = cfg.resolution or 224
    parts, bad = [], []
    for name, d, lf in zip(names, dirs, labels):
        data, bad_one = load_one(name, cfg, d, lf, seed, size)
        parts.append(data)
        bad += bad_one
    if bad:
        import sys

        print(f"note: skipped {len(bad)} unreadable image(s): {', '.join(bad[:10])}"
              f"{' ...' if len(bad) > 10 else ''}", file=sys.stderr)
    data = drop_empty_labels(merge(parts) if len(parts) > 1 else parts[0])
    data.splits = patient_level_split(data.patient_ids, cfg.test_fraction, seed, strata=data.sites)
    return data
