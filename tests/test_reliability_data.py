"""Issue 14, item 1 (and 16): caches follow the files they were built from. An edited label,
an edited, truncated or deleted image is seen by the next run, and the model trained on the
old data is not reused; an NIH --data-dir that is the folder above images/ says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from suite.config import DatasetConfig, ModelConfig
from suite.data.catalog import load_dataset
from suite.errors import SuiteError

N = 10


def _png(path, value: int, size: int = 40):
    from PIL import Image

    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 30, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    for i in range(N):
        _png(root / f"img{i}.png", 60 + 10 * i)
    pd.DataFrame({"image": [f"img{i}.png" for i in range(N)],
                  "Effusion": [i % 2 for i in range(N)]}).to_csv(root / "labels.csv", index=False)
    return root


def _cfg(root):
    return DatasetConfig(name="folder", data_dir=str(root), resolution=32, test_fraction=0.4)


def _labels(data):
    return dict(zip(data.image_ids.tolist(), data.labels[:, 0].tolist()))


def test_edited_label_is_seen_by_the_next_run(folder):
    first, path1 = load_dataset(_cfg(folder), seed=0)
    df = pd.read_csv(folder / "labels.csv")
    df.loc[0, "Effusion"] = 1 - df.loc[0, "Effusion"]          # the user fixes a label
    df.to_csv(folder / "labels.csv", index=False)
    second, path2 = load_dataset(_cfg(folder), seed=0)
    assert path2 != path1
    assert _labels(second)["img0.png"] == 1 - _labels(first)["img0.png"]


def test_edited_truncated_and_deleted_images_are_seen(folder):
    first, path1 = load_dataset(_cfg(folder), seed=0)
    row = list(first.image_ids).index("img1.png")
    _png(folder / "img1.png", 250)                              # the image is replaced
    second, path2 = load_dataset(_cfg(folder), seed=0)
    assert path2 != path1
    assert not np.allclose(second.images[list(second.image_ids).index("img1.png")], first.images[row])
    # a truncated file is no longer served from the cache: it fails (or is skipped) by name
    data = (folder / "img2.png").read_bytes()
    (folder / "img2.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(SuiteError, match="img2.png"):
        load_dataset(_cfg(folder), seed=0)
    cfg = _cfg(folder)
    cfg.on_bad_image = "skip"
    third, _ = load_dataset(cfg, seed=0)
    assert "img2.png" not in third.image_ids
    (folder / "img3.png").unlink()                              # a deleted image
    fourth, _ = load_dataset(cfg, seed=0)
    assert "img3.png" not in fourth.image_ids and len(fourth) == N - 2


def test_same_files_hit_the_cache(folder):
    _, path1 = load_dataset(_cfg(folder), seed=0)
    stamp = path1.stat().st_mtime_ns
    _, path2 = load_dataset(_cfg(folder), seed=0)
    assert path2 == path1 and path2.stat().st_mtime_ns == stamp


def test_the_model_trained_on_old_labels_is_not_reused(folder):
    """The suite's model trains on the vendor's data (issue 13): here the folder is the vendor's
    (`pretrain_dataset`), and an edited vendor label means a new model, not the cached one."""
    from suite.model_source import resolve_model

    model = ModelConfig(epochs=1, batch_size=8)
    site = folder.parent / "hospital"
    site.mkdir()
    for i in range(N):                 # the hospital's own images: other names, other pixels
        _png(site / f"scan{i}.png", 65 + 10 * i)
    pd.DataFrame({"image": [f"scan{i}.png" for i in range(N)],
                  "Effusion": [(i + 1) % 2 for i in range(N)]}).to_csv(site / "labels.csv", index=False)
    hospital = DatasetConfig(name="folder", data_dir=str(site), resolution=32, test_fraction=0.4,
                             pretrain_dataset=f"folder:{folder}")
    data, _ = load_dataset(hospital, seed=0)
    _, ref1 = resolve_model(model, data, seed=0, quick=False, dataset_cfg=hospital)
    _, again = resolve_model(model, data, seed=0, quick=False, dataset_cfg=hospital)
    assert again["path"] == ref1["path"]                      # unchanged data: the cache is used
    df = pd.read_csv(folder / "labels.csv")
    df.loc[1, "Effusion"] = 1 - df.loc[1, "Effusion"]
    df.to_csv(folder / "labels.csv", index=False)
    _, ref2 = resolve_model(model, data, seed=0, quick=False, dataset_cfg=hospital)
    assert ref1["path"] != ref2["path"]


def test_nih_data_dir_above_images_says_where_they_are(nih_sample_dir):
    """`--data-dir DIR` with DIR holding images/ and the CSV (issue 16): say that none of the
    listed images are in DIR, with counts, and point to DIR/images."""
    from suite.data.xrv_sets import load

    with pytest.raises(SuiteError) as err:
        load(DatasetConfig(name="nih", data_dir=str(nih_sample_dir), resolution=32), seed=0)
    msg = str(err.value)
    assert f"none of the images listed in {nih_sample_dir / 'Data_Entry_2017_v2020.csv'}" in msg
    assert "(listed 299, found 0)" in msg
    assert f"pass --data-dir {nih_sample_dir / 'images'}" in msg


def test_train_with_the_nih_parent_folder_is_one_line(nih_sample_dir, tmp_path, capsys):
    from tests.test_reliability_inputs import one_line_error

    one_line_error(capsys, ["train", "--dataset", "nih", "--data-dir", str(nih_sample_dir),
                            "--out", str(tmp_path / "m.pt")],
                   "none of the images listed", "(listed 299, found 0)",
                   f"pass --data-dir {nih_sample_dir / 'images'}")
    assert not (tmp_path / "m.pt").exists()
