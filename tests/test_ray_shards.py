"""Shard parts of the Ray executor, without a cluster: every image in exactly one shard, a
shard is complete or absent, and a merge never counts an image twice (with the failures
these checks must catch)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from suite.executors.shards import (
    complete_shard,
    merge_extra_rows,
    merge_parts,
    merge_predictions,
    shard_count,
    split_images,
    write_shard,
)
from suite.run_folder import RunFolder


def _predictions(ids: list[int]) -> bytes:
    df = pd.DataFrame({"backend_id": "mpc", "image_id": [str(i) for i in ids for _ in (0, 1)],
                       "label": ["A", "B"] * len(ids), "prob": 0.5})
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def test_split_covers_every_image_once_in_order_mix():
    index = list(range(100, 130))
    rank = {i: (i * 7) % 30 for i in index}      # the run's stratified order
    shards = split_images(index, rank, 4)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == index and len(flat) == len(set(flat))
    assert [len(s) for s in shards] == [8, 8, 7, 7]
    assert split_images([5], {}, 3) == [[5]]      # no empty shards


def test_training_runs_whole():
    assert shard_count("training", 50, slots=4, wanted=None) == 1
    assert shard_count("inference", 50, slots=4, wanted=None) == 4
    assert shard_count("inference", 3, slots=4, wanted=8) == 3


def test_shard_complete_or_absent(tmp_path):
    folder = RunFolder(tmp_path)
    write_shard(folder, "mpc", 0, {"status": "ok", "test_index": [1, 2]}, _predictions([1, 2]))
    assert complete_shard(folder, "mpc", 0, [1, 2]) is not None
    assert complete_shard(folder, "mpc", 0, [1, 2, 3]) is None          # planned differently
    # positive controls: a record whose predictions are short, a lost record, a failed shard
    write_shard(folder, "mpc", 1, {"status": "ok", "test_index": [3, 4]}, _predictions([3, 4]))
    meta = json.loads(folder.shard_meta("mpc", 1).read_text())
    folder.shard_predictions("mpc", 1).write_bytes(_predictions([3]))
    assert complete_shard(folder, "mpc", 1, [3, 4]) is None
    folder.shard_meta("mpc", 1).unlink()
    assert complete_shard(folder, "mpc", 1, [3, 4]) is None
    write_shard(folder, "mpc", 2, {"status": "failed", "test_index": [5]}, None)
    assert complete_shard(folder, "mpc", 2, [5]) is None
    assert meta["n_prediction_rows"] == 4


def test_merge_refuses_an_image_counted_twice(tmp_path):
    folder = RunFolder(tmp_path)
    write_shard(folder, "mpc", 0, {"status": "ok", "test_index": [1, 2]}, _predictions([1, 2]))
    write_shard(folder, "mpc", 1, {"status": "ok", "test_index": [3]}, _predictions([3]))
    assert len(merge_predictions(folder, "mpc", 2)) == 6
    write_shard(folder, "mpc", 1, {"status": "ok", "test_index": [2]}, _predictions([2]))
    with pytest.raises(ValueError, match="two shards"):
        merge_predictions(folder, "mpc", 2)


def test_merge_parts_keeps_every_batch_and_sums_traffic():
    def part(n, secs, sent, setup):
        return {"backend_id": "mpc", "backend": "mpc", "n_images": n, "batch_size": 4,
                "timings": {"setup_s": setup, "batch_seconds": secs, "batch_sizes": [n]},
                "traffic": [{"phase": "online", "party": "data_owner", "bytes_sent": sent,
                             "bytes_received": 1, "rounds": 3, "messages": 2}],
                "extra_rows": [{"metric": "party_cpu_time_per_image", "value": secs[0] / n,
                                "party": "data_owner"},
                               {"metric": "party_peak_rss", "value": 100 * n, "party": "data_owner"}],
                "shard": 0, "node": {"node_id": "x"}}
    merged = merge_parts([part(3, [3.0], 10, 1.0), part(1, [2.0], 5, 4.0)])
    assert merged["n_images"] == 4
    assert merged["timings"]["batch_seconds"] == [3.0, 2.0]
    assert merged["timings"]["setup_s"] == 4.0
    assert merged["traffic"][0]["bytes_sent"] == 15 and merged["traffic"][0]["rounds"] == 6
    rows = {r["metric"]: r for r in merged["extra_rows"]}
    assert rows["party_cpu_time_per_image"]["value"] == pytest.approx(5.0 / 4)
    assert rows["party_peak_rss"]["value"] == 300
    assert len(merged["shards"]) == 2


def test_merge_extra_rows_names_a_figure_taken_from_one_shard():
    rows = merge_extra_rows([[{"metric": "key_setup_time", "value": 1.0}],
                             [{"metric": "key_setup_time", "value": 2.0}]], [1, 1])
    assert rows[0]["value"] == 1.0 and "shard 0" in rows[0]["note"]
