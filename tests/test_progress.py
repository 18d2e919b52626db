"""Progress a person can wait on: the harness writes images done of total after every batch,
the parent shows it (a plain line at most every ~30 s when not a terminal)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions
from suite.data.synthetic import generate_synthetic
from suite.harness import measure
from suite.meter import CommMeter
from suite.run_folder import RunFolder
from suite.threat_model import ThreatModel
from tests.shared_runs import TINY_CLI_BACKENDS


@dataclass
class SlowOptions(BackendOptions):
    batch_size: int = 4
    seconds_per_batch: float = 0.3


class SlowBackend(Backend):
    """A test backend that takes its time and notes what the progress file said before each
    batch (the harness, not the backend, writes that file)."""

    name = "slow"
    track = "inference"
    Options = SlowOptions

    def threat_model(self):
        return ThreatModel(protects=(), from_whom="nobody", adversary="none", parties=("test",),
                           trust_assumptions=("test only",), guarantee_kind="none", guarantee="none",
                           leaks=("everything",), protected_scope="nothing")

    def setup(self, ctx):
        self.n = len(ctx.model.pathologies)
        self.progress = RunFolder(ctx.workdir.parent.parent).progress(ctx.workdir.name)
        self.seen: list[int] = []

    def predict_proba(self, images, meta=None):
        self.seen.append(json.loads(self.progress.read_text())["done"])
        time.sleep(self.options.seconds_per_batch)
        return np.full((len(images), self.n), 0.5)


def test_harness_writes_progress_after_every_batch(tmp_path):
    test = generate_synthetic(n_train_per_site=1, n_test_per_site=2, size=32, seed=0).split("test")
    folder = RunFolder(tmp_path / "run")
    workdir = folder.workdir("slow")
    workdir.mkdir(parents=True)
    folder.parts_dir.mkdir()
    backend = SlowBackend(SlowOptions(batch_size=3, seconds_per_batch=0.0))
    ctx = BackendContext(model=SimpleNamespace(pathologies=list(test.label_names)),
                         meter=CommMeter(), workdir=workdir, progress_path=folder.progress("slow"))
    measure(backend, ctx, test, None, progress=False)
    n = len(test)
    assert backend.seen == list(range(0, n, 3))             # before batch k: k batches done
    final = json.loads(folder.progress("slow").read_text())
    assert final["done"] == final["total"] == n and final["elapsed_s"] >= 0


def test_parent_prints_progress_of_a_slow_backend(tiny_cli_run):
    """On the tiny CLI run tests/test_runner.py asserts on too (it includes this backend:
    tests/shared_runs.py), so the slow backend costs no run of its own."""
    out, proc = tiny_cli_run
    assert "slow" in TINY_CLI_BACKENDS.split(",")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = json.loads((out / "run.json").read_text())["backends"]["slow"]["n_images"]
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("slow: ")]
    # not a terminal: one plain line (then at most one per 30 s), with rate and time left
    assert len(lines) == 1, proc.stdout
    assert f"/{n} images" in lines[0] and "img/s" in lines[0] and "left" in lines[0], lines[0]


def test_plain_progress_lines_are_rate_limited(tmp_path):
    from rich.console import Console

    from suite.results import write_json_atomic
    from suite.runner import ProgressLine

    path = tmp_path / "p.json"
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with ProgressLine(console, path, "x") as shown:
        shown.poll()                                          # no file yet: nothing, no error
        for done in (5, 10, 15):
            write_json_atomic(path, {"done": done, "total": 20, "elapsed_s": done / 5.0})
            shown.poll()
    assert buf.getvalue().splitlines() == ["  x: 5/20 images, 5 img/s, about 3 s left"]
