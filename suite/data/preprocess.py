"""Pixels to model input exactly as torchxrayvision's models expect: one channel,
values in [-1024, 1024], centre crop to a square, resize to the model's side."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from suite.errors import SuiteError

# Part of every dataset cache key: a change to how pixels become model input re-prepares data.
PREPROCESS_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


class BadImage(SuiteError):
    """An image file that cannot be decoded; the message names the file."""


def to_xrv_range(img: np.ndarray, maxval: float, minval: float = 0.0) -> np.ndarray:
    """Linear map of [minval, maxval] to [-1024, 1024] (xrv.utils.normalize, with an offset)."""
    span = maxval - minval
    if span <= 0:
        raise ValueError("image has no dynamic range")
    return ((img.astype(np.float32) - minval) / span * 2048.0 - 1024.0).astype(np.float32)


def crop_and_resize(img: np.ndarray, size: int) -> np.ndarray:
    """[H, W] in xrv range -> [1, size, size] with xrv's centre crop and resizer."""
    import torchxrayvision as xrv

    x = img[None, ...]
    x = xrv.datasets.XRayCenterCrop()(x)
    x = xrv.datasets.XRayResizer(size, engine="cv2" if _has_cv2() else "skimage")(x)
    return x.astype(np.float32)


def _has_cv2() -> bool:
    from importlib.util import find_spec

    return find_spec("cv2") is not None


def read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG -> [H, W] in xrv range (colour images are averaged to grey)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BadImage(f"cannot decode image {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    maxval = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
    return to_xrv_range(arr, maxval)


def read_dicom(path: Path) -> np.ndarray:
    """DICOM -> [H, W] in xrv range, honouring rescale, windowing (VOI LUT) and MONOCHROME1."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for broken files
        raise BadImage(f"cannot decode DICOM {path}: {type(exc).__name__}: {exc}") from None
    arr = apply_modality_lut(arr, ds)
    center, width = _window(ds)
    if width:                                  # linear window: clip to centre +- width / 2
        lo, hi = center - width / 2, center + width / 2
    else:
        if "VOILUTSequence" in ds:             # a lookup-table window
            arr = apply_voi_lut(arr, ds)
        lo, hi = float(arr.min()), float(arr.max())
    arr = np.clip(arr, lo, hi)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = hi - (arr - lo)  # MONOCHROME1: high values are dark; flip to MONOCHROME2
    if hi <= lo:
        raise BadImage(f"DICOM {path} has no dynamic range after windowing")
    return to_xrv_range(arr, hi, lo)


def _window(ds) -> tuple[float, float | None]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return 0.0, None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
    return first(center), first(width)


def read_any(path: Path) -> np.ndarray:
    if not path.exists():
        raise BadImage(f"image file not found: {path}")
    if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
        return read_dicom(path)
    return read_raster(path)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
