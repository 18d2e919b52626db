"""The xdist units tests/file_scheduling.py makes: a file's tests on one worker (its module
fixtures built once), a spread file's tests one by one, a shared run's tests with its file."""

from __future__ import annotations

import pytest

pytest.importorskip("xdist")

from tests.file_scheduling import file_scope  # noqa: E402

SPREAD = ("test_conformance.py",)
JOINS = {"fl[resolution=32,rounds=2]": "test_fl.py"}


def test_a_files_tests_are_one_unit():
    assert file_scope("tests/test_tee.py::test_a", SPREAD, JOINS) == "tests/test_tee.py"
    assert file_scope("tests/test_tee.py::test_b[x-1]", SPREAD, JOINS) == "tests/test_tee.py"
    assert file_scope("tests/test_tee.py::TestX::test_c", SPREAD, JOINS) == "tests/test_tee.py"


def test_a_spread_files_tests_are_units_of_their_own():
    a = "tests/test_conformance.py::test_configuration_conforms[null]"
    b = "tests/test_conformance.py::test_configuration_conforms[fl[privacy=dp,resolution=32,rounds=2]]"
    assert file_scope(a, SPREAD, JOINS) == a and file_scope(b, SPREAD, JOINS) == b


def test_a_shared_runs_test_joins_the_file_it_shares_with():
    nodeid = "tests/test_conformance.py::test_configuration_conforms[fl[resolution=32,rounds=2]]"
    assert file_scope(nodeid, SPREAD, JOINS) == "tests/test_fl.py"
    assert file_scope(nodeid, SPREAD, {}) == nodeid          # control: without the join, alone


def test_a_joined_files_tests_join_the_file_whose_run_they_share():
    file_joins = {"test_progress.py": "test_runner.py"}
    nodeid = "tests/test_progress.py::test_parent_prints_progress_of_a_slow_backend"
    assert file_scope(nodeid, SPREAD, JOINS, file_joins) == "tests/test_runner.py"
    assert file_scope(nodeid, SPREAD, JOINS) == "tests/test_progress.py"       # control: no join
    assert file_scope("tests/test_tee.py::test_a", SPREAD, JOINS, file_joins) == "tests/test_tee.py"


def test_shared_files_join_a_file_scheduled_before_them():
    """The joined file's tests run after the file they join, whose first test builds the run."""
    from tests.conftest import LONG_FILES
    from tests.shared_runs import SHARED_FILES

    for joined, host in SHARED_FILES.items():
        assert host in LONG_FILES and (joined not in LONG_FILES or
                                       LONG_FILES.index(host) < LONG_FILES.index(joined)), (joined, host)


def test_loadgroup_gets_the_file_scheduler(pytestconfig):
    from tests.conftest import pytest_xdist_make_scheduler
    from tests.file_scheduling import FileScheduling

    class Config:
        option = pytestconfig.option

        @staticmethod
        def getvalue(name):
            return {"dist": "loadgroup", "tx": ["2*popen"]}.get(name, pytestconfig.getvalue(name))

    assert isinstance(pytest_xdist_make_scheduler(Config, None), FileScheduling)
    Config.getvalue = staticmethod(lambda name: "load" if name == "dist" else None)
    assert pytest_xdist_make_scheduler(Config, None) is None      # other modes: xdist's own


def test_every_long_and_spread_file_exists():
    """A renamed file left in LONG_FILES would silently lose its place at the front."""
    from tests.conftest import LONG_FILES, REPO, SPREAD_FILES

    missing = [name for name in LONG_FILES + SPREAD_FILES if not (REPO / "tests" / name).is_file()]
    assert not missing, f"tests/conftest.py names files that are not there: {missing}"
    assert len(set(LONG_FILES)) == len(LONG_FILES)


def test_replay_follows_loadscope_a_worker_takes_the_next_unit_at_two_pending():
    """tests/timeline.py's replay of xdist's LoadScope: the first worker down to two pending
    tests gets the next unit. Worker 0 (A: three 10 s tests) gets there at 10 s, before worker
    1 (B: 30 s, then two short ones) at 30 s, so C goes to worker 0; give A a fourth test and
    worker 1 (now B: 5 s first) gets there first and takes C."""
    from tests.timeline import simulate

    lanes = simulate([("A", [10, 10, 10]), ("B", [30, 1, 1]), ("C", [20])])
    assert [lane["units"] for lane in lanes] == [["A", "C"], ["B"]]
    assert [lane["end"] for lane in lanes] == [50, 32]
    lanes = simulate([("A", [10, 10, 10, 10]), ("B", [5, 1, 1]), ("C", [20])])
    assert [lane["units"] for lane in lanes] == [["A"], ["B", "C"]]
    assert [lane["end"] for lane in lanes] == [40, 27]


def test_timeline_groups_a_workers_tests_into_files(tmp_path):
    from tests.timeline import describe, record, units

    path = tmp_path / "tl.jsonl"
    for node in ("tests/test_a.py::x", "tests/test_a.py::y", "tests/test_b.py::z"):
        record(str(path), "gw0", node, start=0.0, cpu_start=0.0)
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    runs = units(rows)["gw0"]
    assert [(u["file"], u["tests"]) for u in runs] == [("tests/test_a.py", 2), ("tests/test_b.py", 1)]
    assert "gw0: last test ended" in describe(rows)


def test_per_file_totals_and_longest_first_order():
    """`--per-file` sums a file's tests; `--suggest` ranks files by their unit's seconds, a
    spread file by its longest test, and a joined file's tests count with the file they join."""
    from tests.timeline import longest_first, per_file

    def row(nodeid, seconds, cpu=1.0):
        return {"worker": "gw0", "nodeid": nodeid, "start": 0.0, "end": seconds, "cpu_s": cpu}

    rows = [row("tests/test_a.py::x", 10), row("tests/test_a.py::y", 15),
            row("tests/test_b.py::z", 30, cpu=20.0),
            row("tests/test_conformance.py::test_configuration_conforms[null]", 5),
            row("tests/test_conformance.py::test_configuration_conforms[he]", 12),
            row("tests/test_runner.py::r", 20), row("tests/test_progress.py::p", 15)]
    totals = {f: (n, w, c) for f, n, w, c in per_file(rows)}
    assert totals["tests/test_a.py"] == (2, 25.0, 2.0) and totals["tests/test_b.py"] == (1, 30.0, 20.0)
    assert [f for f, *_ in per_file(rows)][:2] == ["tests/test_b.py", "tests/test_a.py"]   # by file
    order = longest_first(rows)
    # test_runner's unit holds test_progress's test (35 s); conformance counts its longest, 12 s
    assert order[:3] == ("test_runner.py", "test_b.py", "test_a.py")
    assert order.index("test_conformance.py") == 3 and "test_progress.py" not in order
