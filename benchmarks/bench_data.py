"""Data loading must not dominate inference: images per second for loading and
preprocessing real chest X-rays next to plaintext inference on the same images."""

from __future__ import annotations

import tempfile
from pathlib import Path

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"


class RealDataThroughput:
    """NIH ChestX-ray14 sample (299 PNGs) through torchxrayvision's loader at 224 px."""

    timeout = 300

    def setup(self):
        if not NIH.exists():
            raise NotImplementedError("needs ../shared/data/nih-cxr14-sample")  # asv: skipped
        from benchmarks._fixtures import context, small_model

        self.cfg = self._cfg()
        data = self._load()
        from backends.reference.plaintext import PlaintextBackend

        self.images = data.images[:64]
        self.backend = PlaintextBackend()
        self.backend.setup(context(small_model(data.label_names, 224), tempfile.mkdtemp()))

    @staticmethod
    def _cfg():
        from suite.config import DatasetConfig

        return DatasetConfig(name="nih", data_dir=str(NIH / "images"),
                             label_file=str(NIH / "Data_Entry_2017_v2020.csv"), resolution=224)

    def _load(self):
        from suite.data.xrv_sets import load

        return load(self.cfg, seed=0)

    def track_loading_images_per_second(self):
        import time

        start = time.perf_counter()
        data = self._load()
        return len(data) / (time.perf_counter() - start)

    track_loading_images_per_second.unit = "images/s"

    def track_plaintext_inference_images_per_second(self):
        import time

        start = time.perf_counter()
        self.backend.predict_proba(self.images)
        return len(self.images) / (time.perf_counter() - start)

    track_plaintext_inference_images_per_second.unit = "images/s"
