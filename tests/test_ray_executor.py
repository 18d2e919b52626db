"""The Ray executor on a real two-node Ray cluster started on loopback by the test: one run
folder, plaintext predictions identical to a local run's, every image scored exactly once,
the node recorded per shard, and a resume that re-runs only the shard that was lost.

The cluster's processes are stopped by id at the end, even on failure (never `ray stop`,
which would stop other people's Ray processes too).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import psutil
import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow   # two Ray nodes and two MPC parties per shard: ~1 min quiet, more under load

from suite.executors.local_cluster import LocalRayCluster  # noqa: E402
from suite.run_folder import RunFolder  # noqa: E402

CONFIG = """
[run]
backends = ["plaintext", "mpc"]
timeout_s = 600
threads = 1

[dataset]
name = "synthetic"
resolution = 32
n_train_per_site = 8
n_test_per_site = 1

[model]
epochs = 1
"""


def main(argv: list[str]) -> int:
    """`python -m suite ARGV` in its own process (Ray's driver state never enters pytest's)."""
    proc = subprocess.run([sys.executable, "-m", "suite", *argv], capture_output=True, text=True,
                          timeout=900)
    OUTPUT.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode


OUTPUT: list[str] = []


@pytest.fixture(scope="session")
def cluster():
    """One two-node cluster for the session (starting one is most of this file's time); when it
    is stopped, none of its nodes' processes is left, daemons that left the tree included."""
    with LocalRayCluster(nodes=2, cpus_per_node=1, object_store_mb=100) as c:
        sessions = [p.pid for p in c.procs]
        yield c
    assert not [q for sid in sessions for q in LocalRayCluster._session(sid) if _alive(q)], \
        "the Ray cluster left processes running"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:          # it ended while we looked
        return False


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "ray-tiny.toml"
    path.write_text(textwrap.dedent(CONFIG))
    return path


@pytest.fixture(scope="module")
def ray_run(cluster, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "run"
    rc = main(["run", "--config", str(config), "--out", str(out), "--executor", "ray",
               "--ray-address", cluster.address, "--no-report"])
    assert rc == 0
    return out


def _preds(run_dir, backend_id):
    p = pd.read_parquet(RunFolder(run_dir).predictions)
    return p[p.backend_id == backend_id].sort_values(["image_id", "label"]).reset_index(drop=True)


def test_one_run_folder_same_as_local(ray_run, config, tmp_path):
    local = tmp_path / "local"
    assert main(["run", "--config", str(config), "--backends", "plaintext", "--out", str(local),
                 "--no-report"]) == 0
    ray_plain, local_plain = _preds(ray_run, "plaintext"), _preds(local, "plaintext")
    assert ray_plain[["image_id", "label"]].equals(local_plain[["image_id", "label"]])
    # the same model on the same images; only the batches differ (a shard's images are batched
    # together), which moves float32 results by ~1e-8 (measured 2.8e-8)
    np.testing.assert_allclose(ray_plain.prob.to_numpy(), local_plain.prob.to_numpy(), rtol=0, atol=1e-6)
    everything = pd.read_parquet(RunFolder(ray_run).predictions)
    assert not everything.duplicated(["backend_id", "image_id", "label"]).any()
    assert set(_preds(ray_run, "mpc").image_id) == set(local_plain.image_id)
    rows = pd.read_json(RunFolder(ray_run).results, lines=True)
    for bid in ("plaintext", "mpc"):
        assert (rows[(rows.backend_id == bid)].metric == "wall_time").sum() == 1
        n = rows[(rows.backend_id == bid) & (rows.metric == "n_images")].value.item()
        assert n == local_plain.image_id.nunique()


def test_progress_streamed_to_the_driver(ray_run):
    import re

    # images done as the workers' harness reported them (a plain line: output is not a terminal)
    assert any(re.search(r"mpc: shards \d/2 done, [1-9]\d*/\d+ images", out) for out in OUTPUT)


def test_node_recorded_per_shard(ray_run):
    state = json.loads(RunFolder(ray_run).run_json.read_text())
    assert state["executor"]["kind"] == "ray" and state["executor"]["wall_s"] > 0
    for bid in ("plaintext", "mpc"):
        shards = state["backends"][bid]["shards"]
        assert len(shards) == 2
        assert len({s["node"]["node_id"] for s in shards}) == 2     # both nodes worked
        for s in shards:
            part = json.loads(RunFolder(ray_run).shard_meta(bid, s["shard"]).read_text())
            assert part["node"]["node_id"] == s["node"]["node_id"]
        indexes = [json.loads(RunFolder(ray_run).shard_meta(bid, k).read_text())["test_index"]
                   for k in range(2)]
        assert not set(indexes[0]) & set(indexes[1])


def test_resume_reruns_only_the_lost_shard(ray_run, cluster):
    folder = RunFolder(ray_run)
    before = [json.loads(folder.shard_meta("plaintext", k).read_text()) for k in range(2)]
    folder.shard_meta("plaintext", 1).unlink()                  # shard 1 was lost
    state = json.loads(folder.run_json.read_text())
    state["backends"]["plaintext"]["status"] = "running"       # as an interrupted run leaves it
    folder.run_json.write_text(json.dumps(state))
    assert main(["run", "--resume", str(ray_run), "--executor", "ray", "--ray-address",
                 cluster.address, "--no-report"]) == 0
    after = [json.loads(folder.shard_meta("plaintext", k).read_text()) for k in range(2)]
    assert after[0]["finished_at"] == before[0]["finished_at"]      # kept, not re-run
    assert after[1]["finished_at"] > before[1]["finished_at"]       # re-run
    assert after[1]["test_index"] == before[1]["test_index"]
    plain = _preds(ray_run, "plaintext")
    assert not plain.duplicated(["image_id", "label"]).any()
    assert plain.image_id.nunique() == len(before[0]["test_index"]) + len(before[1]["test_index"])
    rows = pd.read_json(folder.results, lines=True)
    assert (rows[rows.backend_id == "plaintext"].metric == "wall_time").sum() == 1
    assert json.loads(folder.run_json.read_text())["backends"]["plaintext"]["status"] == "ok"
