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
