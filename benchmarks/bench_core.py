"""Per-image cost of the reference and the harness floor, and the generator's throughput."""

from __future__ import annotations

import tempfile

from benchmarks._fixtures import batch, context, small_model, synthetic


class PlaintextPerImage:
    """Small DenseNet at 64 px, batch 32: the reference every secure backend is read against."""

    def setup(self):
        from backends.reference.plaintext import PlaintextBackend

        self.data = synthetic(n_per_site=5)
        self.backend = PlaintextBackend()
        self.backend.setup(context(small_model(self.data.label_names), tempfile.mkdtemp()))
        self.x = batch(self.data, 32)

    def time_predict_batch32(self):
        self.backend.predict_proba(self.x)


class NullPerImage:
    """The harness floor: a predict call that computes nothing."""

    def setup(self):
        from backends.reference.null import NullBackend

        self.data = synthetic(n_per_site=5)
        self.backend = NullBackend()
        self.backend.setup(context(small_model(self.data.label_names), tempfile.mkdtemp()))
        self.x = batch(self.data, 32)

    def time_predict_batch32(self):
        self.backend.predict_proba(self.x)


class HarnessLoop:
    """The whole measured loop (setup, batches, checks, teardown) around the null backend."""

    def setup(self):
        self.data = synthetic(n_per_site=20).split("test")
        self.model = small_model(self.data.label_names)

    def time_measure_null_140_images(self):
        from backends.reference.null import NullBackend
        from suite.harness import measure

        measure(NullBackend(), context(self.model, tempfile.mkdtemp()), self.data, None, progress=False)


class SyntheticGenerator:
    """Phantoms per second: the default dataset must build in seconds."""

    params = [64, 224]
    param_names = ["size"]

    def time_generate_700(self, size):
        from suite.data.synthetic import generate_synthetic

        generate_synthetic(n_train_per_site=50, n_test_per_site=50, size=size, seed=1)

    def track_images_per_second(self, size):
        import time

        from suite.data.synthetic import generate_synthetic

        start = time.perf_counter()
        generate_synthetic(n_train_per_site=50, n_test_per_site=50, size=size, seed=1)
        return 700 / (time.perf_counter() - start)

    track_images_per_second.unit = "images/s"


class Metrics:
    """DeLong and the bootstrap run for every backend x site x label."""

    def setup(self):
        import numpy as np

        rng = np.random.default_rng(0)
        self.y = (rng.random((700, 5)) < 0.25).astype(float)
        self.p = np.clip(self.y * 0.3 + rng.random((700, 5)) * 0.7, 0, 1)

    def time_delong_paired_700(self):
        from suite.metrics.auroc import paired_delong

        paired_delong(self.y[:, 0], self.p[:, 0], self.p[:, 1])

    def time_bootstrap_macro_1000(self):
        from suite.metrics.auroc import bootstrap_macro_auroc

        bootstrap_macro_auroc(self.y, self.p, n_boot=1000)
