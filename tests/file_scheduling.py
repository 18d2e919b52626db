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


def file_scope(nodeid: str, spread_files: tuple[str, ...], joins: dict[str, str],
               file_joins: dict[str, str] | None = None) -> str:
    """The unit a test is scheduled in: its file, or the test itself in a spread file, or for
    a test of a spread file whose parameter id is in `joins`, the file named there, or for a
    test of a file in `file_joins`, the file named there (it shares a run with that file:
    tests/shared_runs.py)."""
    file = nodeid.split("::", 1)[0]
    name = PurePosixPath(file).name
    if file_joins and name in file_joins:
        return str(PurePosixPath(file).with_name(file_joins[name]))
    if name not in spread_files:
        return file
    param = nodeid[nodeid.find("[") + 1:-1] if nodeid.endswith("]") else None
    if param in joins:
        return str(PurePosixPath(file).with_name(joins[param]))
    return nodeid


class FileScheduling(LoadScopeScheduling):
    """LoadScope's queue in collection order (tests/conftest.py orders it), one unit per file."""

    def __init__(self, config, log=None, spread_files: tuple[str, ...] = (),
                 joins: dict[str, str] | None = None, file_joins: dict[str, str] | None = None) -> None:
        super().__init__(config, log)
        self.spread_files, self.joins, self.file_joins = spread_files, joins or {}, file_joins or {}

    def _split_scope(self, nodeid: str) -> str:
        return file_scope(nodeid, self.spread_files, self.joins, self.file_joins)
