"""A backend that fails while SUITE_TEST_FLAKY=fail is set and works without it: a failed
configuration that `--resume` must run again (tests/test_resume.py)."""

from __future__ import annotations

import os

import numpy as np

from tests.faulty_backends import _Base


class FlakyBackend(_Base):
    name = "flaky"

    def predict_proba(self, images, meta=None):
        if os.environ.get("SUITE_TEST_FLAKY") == "fail":
            raise RuntimeError("deliberate failure before the resume")
        return np.full((len(images), self.n), 0.5)


EXTRA = "flaky=tests.flaky_backend:FlakyBackend"
