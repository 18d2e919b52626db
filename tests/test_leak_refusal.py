"""The overlap refusal under `--split all` (suite/model_source.py check_no_leak): one line
that names the checkpoint, says how many of its recorded training images are among the
images scored, and what to do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from suite.errors import SuiteError
from suite.model_source import check_no_leak


def _trained_on(model, data):
    return dataclasses.replace(model, extra={"train_image_ids": data.split("train").image_ids.tolist()})


def test_split_all_refusal_names_checkpoint_count_and_remedy(tiny_model, tiny_data):
    everything = dataclasses.replace(tiny_data, splits=np.full(len(tiny_data), "test", dtype=object))
    bundle = _trained_on(tiny_model, tiny_data)
    n_train = int((tiny_data.splits == "train").sum())
    with pytest.raises(SuiteError) as err:
        check_no_leak(bundle, everything, "/ckpt/tiny.pt", "all")
    text = str(err.value)
    assert "\n" not in text
    assert "checkpoint /ckpt/tiny.pt" in text
    assert f"trained on {n_train} of this run's {len(tiny_data)} test images" in text
    assert f"{n_train} of its {n_train} recorded training images" in text
    assert "dataset it never saw" in text and "drop --split all" in text


def test_positive_control_the_held_out_split_passes(tiny_model, tiny_data):
    """The same checkpoint on the train-test split it was trained with: nothing to refuse."""
    check_no_leak(_trained_on(tiny_model, tiny_data), tiny_data, "/ckpt/tiny.pt", "train-test")
