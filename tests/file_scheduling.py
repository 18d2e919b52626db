"""pytest-xdist scheduling by test file, with a few files spread test by test.

`--dist loadgroup` groups by the `xdist_group` mark through a suffix xdist appends to
`item._nodeid`; pytest 9 reads a node's id from `_id`, so the suffix never reaches the
scheduler and every test was its own unit: a file's module-scoped runs (a Ray cluster, a
trained model, a started enclave) were built once per worker. This scheduler reads the file
from the node id itself, so it does not depend on that private attribute.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from xdist.scheduler import LoadScopeScheduling


def file_scope(nodeid: str, spread_files: tuple[str, ...]) -> str:
    """The unit a test is scheduled in: its file, or the test itself for a spread file."""
    file = nodeid.split("::", 1)[0]
    return nodeid if PurePosixPath(file).name in spread_files else file


class FileScheduling(LoadScopeScheduling):
    """LoadScope's queue in collection order (tests/conftest.py orders it), one unit per file."""

    def __init__(self, config, log=None, spread_files: tuple[str, ...] = ()) -> None:
        super().__init__(config, log)
        self.spread_files = spread_files

    def _split_scope(self, nodeid: str) -> str:
        return file_scope(nodeid, self.spread_files)
