"""Real chest X-rays: the NIH sample through torchxrayvision's own loader, DICOM and
folder exports, and the errors a hospital IT team will hit first."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from suite.config import DatasetConfig
from suite.errors import SuiteError
from tests.conftest import run_cli, run_main


def _nih_cfg(nih_sample_dir, **kw):
    return DatasetConfig(name="nih", data_dir=str(nih_sample_dir / "images"),
                         label_file=str(nih_sample_dir / "Data_Entry_2017_v2020.csv"),
                         resolution=32, **kw)


@pytest.fixture(scope="module")
def nih(nih_sample_dir):
    """The sample through torchxrayvision's loader (suite.data.xrv_sets, by the catalog), at
    32 px: the same configuration as test_train_then_run_on_the_rest's, so its `suite train`
    and `suite run` read the prepared set this builds instead of decoding the 299 PNGs again."""
    from suite.data.catalog import load_dataset

    data, _ = load_dataset(_nih_cfg(nih_sample_dir), seed=0)
    return data


def test_nih_sample_loads_through_xrv(nih):
    assert len(nih) == 299
    assert nih.images.shape[1:] == (1, 32, 32)
    assert nih.images.min() >= -1024.001 and nih.images.max() <= 1024.001
    assert "Cardiomegaly" in nih.label_names and "Pleural_Thickening" in nih.label_names
    assert nih.image_ids[0].startswith("nih:") and nih.image_ids[0].endswith(".png")


def test_split_is_patient_level(nih):
    train = set(nih.patient_ids[nih.splits == "train"])
    test = set(nih.patient_ids[nih.splits == "test"])
    assert train and test and not (train & test)


def test_train_then_run_on_the_rest(nih_sample_dir, tmp_path):
    """`suite train` on the training split, then `suite run` on the held-out split."""
    cfg = tmp_path / "nih.toml"
    cfg.write_text(f"""
[run]
backends = ["plaintext", "null", "tee", "he", "mpc:max_images=8"]
[dataset]
name = "nih"
data_dir = "{nih_sample_dir / 'images'}"
label_file = "{nih_sample_dir / 'Data_Entry_2017_v2020.csv'}"
resolution = 32
[model]
epochs = 1
""")
    ckpt = tmp_path / "nih.pt"
    proc = run_cli("train", "--config", str(cfg), "--dataset", "nih",
                   "--data-dir", str(nih_sample_dir / "images"),
                   "--label-file", str(nih_sample_dir / "Data_Entry_2017_v2020.csv"), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch

    meta = torch.load(ckpt, weights_only=False)["meta"]
    assert meta["architecture"] and meta["pathologies"] and meta["preprocessing"]
    assert meta["data_fingerprint"] and meta["recipe"]["epochs"] == 1
    out = tmp_path / "run"
    proc = run_cli("run", "--config", str(cfg), "--model", str(ckpt), "--out", str(out),
                   "--no-report")                    # the report has its own tests
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((out / "run.json").read_text())["backends"]
    assert {b: s["status"] for b, s in state.items()} == {b: "ok" for b in state}
    preds = pd.read_parquet(out / "predictions.parquet")
    ref = preds[preds.backend_id == "plaintext"].set_index(["image_id", "label"]).prob
    for backend in ("tee", "he", "mpc[max_images=8]"):
        got = preds[preds.backend_id == backend].set_index(["image_id", "label"]).prob
        assert len(got) and (got - ref.reindex(got.index)).abs().max() < 1e-3, backend
    trained = set(meta["extra"]["train_image_ids"])
    assert trained and not (trained & set(preds.image_id))
    assert preds.prob.between(0, 1).all()


def test_mpc_fidelity_holds_for_the_untrained_model(nih_sample_dir, tmp_path):
    """Random BatchNorm statistics leave activations in the thousands and logits near +-450:
    with CrypTen's local truncation at 16 bits this model lost fidelity (one image flipped
    outright, max |dp| 1.0 on 48 images). Exact truncation at the calibrated precision holds
    (8 real images at 224 px: the model's activations, not the number of images, are the point)."""
    out = tmp_path / "run"
    proc = run_cli("run", "--dataset", "nih", "--data-dir", str(nih_sample_dir / "images"),
                   "--label-file", str(nih_sample_dir / "Data_Entry_2017_v2020.csv"),
                   "--model", "small-densenet-untrained", "--backends", "plaintext,mpc:max_images=8",
                   "--out", str(out), "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_json(out / "results.jsonl", lines=True)
    mpc = rows[rows.backend_id == "mpc[max_images=8]"]
    values = lambda metric: mpc[mpc.metric == metric].value.dropna()  # noqa: E731
    assert len(values("max_abs_diff")) >= 14 and values("max_abs_diff").max() < 1e-3
    assert values("fixed_point_precision_bits").iloc[0] >= 18
    assert len(values("delong_p")) and (values("delong_p") > 0.05).all()


def test_checkpoint_for_other_labels_is_a_clear_error(nih_sample_dir, tmp_path):
    from suite.models import SMALL_DENSENET, ModelBundle, build_densenet, save_checkpoint

    bundle = ModelBundle(net=build_densenet(SMALL_DENSENET, 2), name="other", architecture=SMALL_DENSENET,
                         pathologies=["Cardiomegaly", "Fracture"], resolution=32, source="test")
    save_checkpoint(bundle, tmp_path / "other.pt")
    proc = run_main("run", "--dataset", "nih", "--data-dir", str(nih_sample_dir / "images"),
                    "--label-file", str(nih_sample_dir / "Data_Entry_2017_v2020.csv"),
                    "--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "does not predict dataset label" in proc.stderr
    assert "Traceback" not in proc.stderr


def _write_dicom(path, pixels: np.ndarray, monochrome1: bool, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    stored = (4095 - pixels) if monochrome1 else pixels
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_folder(nih_sample_dir, tmp_path_factory):
    """Six NIH PNGs as 12-bit DICOM (half MONOCHROME1) plus the same PNGs, and a label CSV."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dicom")
    rows = []
    pngs = sorted((nih_sample_dir / "images").glob("*.png"))[:6]
    for i, png in enumerate(pngs):
        pixels = np.asarray(Image.open(png).convert("L")).astype(np.uint16) * 16  # 8 -> 12 bit
        _write_dicom(root / f"img{i}.dcm", pixels, monochrome1=i % 2 == 1, window=(2040, 4080))
        Image.open(png).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.dcm", "Cardiomegaly": i % 2, "Effusion": (i // 2) % 2,
                     "site": f"h{i % 2}", "patient": f"p{i}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_dicom_matches_the_png_it_came_from(dicom_folder):
    from suite.data.preprocess import read_any

    for i in range(4):
        dcm, png = read_any(dicom_folder / f"img{i}.dcm"), read_any(dicom_folder / f"img{i}.png")
        assert dcm.shape == png.shape
        # MONOCHROME1 is inverted back; 12-bit windowing keeps the picture (r ~ 1)
        assert np.corrcoef(dcm.ravel(), png.ravel())[0, 1] > 0.99, f"img{i}"
        assert abs(dcm.mean() - png.mean()) < 40


def test_folder_adapter_reads_dicom_with_sites(dicom_folder):
    from suite.data.folder import load

    data = load(DatasetConfig(name="folder", data_dir=str(dicom_folder), resolution=32,
                              test_fraction=0.5), seed=0)
    assert len(data) == 6 and data.label_names == ["Cardiomegaly", "Effusion"]
    assert set(data.sites) == {"h0", "h1"} and set(data.splits) == {"train", "test"}


def test_corrupt_file_is_named_and_can_be_skipped(dicom_folder, tmp_path):
    import shutil

    from suite.data.folder import load

    root = tmp_path / "f"
    shutil.copytree(dicom_folder, root)
    (root / "img3.dcm").write_bytes(b"DICM but not really" * 10)
    with pytest.raises(SuiteError, match="img3.dcm"):
        load(DatasetConfig(name="folder", data_dir=str(root), resolution=32), seed=0)
    data = load(DatasetConfig(name="folder", data_dir=str(root), resolution=32, on_bad_image="skip",
                              test_fraction=0.5), seed=0)
    assert len(data) == 5 and "img3.dcm" not in set(data.image_ids)


def test_label_file_errors_are_clear(dicom_folder, tmp_path):
    from suite.data.folder import load

    bad = tmp_path / "bad.csv"
    pd.read_csv(dicom_folder / "labels.csv").rename(columns={"image": "file"}).to_csv(bad, index=False)
    with pytest.raises(SuiteError, match="lacks column 'image'"):
        load(DatasetConfig(name="folder", data_dir=str(dicom_folder), label_file=str(bad)), seed=0)
    df = pd.read_csv(dicom_folder / "labels.csv").astype({"Effusion": object})
    df.loc[2, "Effusion"] = "maybe"
    df.to_csv(bad, index=False)
    with pytest.raises(SuiteError, match="'Effusion'.*row 4"):
        load(DatasetConfig(name="folder", data_dir=str(dicom_folder), label_file=str(bad)), seed=0)


def test_nih_label_file_missing_a_column(nih_sample_dir, tmp_path):
    from suite.data.xrv_sets import load

    csv = pd.read_csv(nih_sample_dir / "Data_Entry_2017_v2020.csv").drop(columns=["Finding Labels"])
    csv.to_csv(tmp_path / "labels.csv", index=False)
    cfg = _nih_cfg(nih_sample_dir)
    cfg.label_file = str(tmp_path / "labels.csv")
    with pytest.raises(SuiteError, match="Finding Labels"):
        load(cfg, seed=0)
