"""Every asv benchmark runs: its setup (and setup_cache) and one call on its first parameters.

`asv check` only imports the benchmark files; a benchmark whose setup raises (as
`MPCEngines.setup_cache` once did with KeyError 'rounds') would still pass it and silently
never produce a number. This runs each one once, on its smallest parameters (asv lists
them first by convention here), so a change that breaks a benchmark fails CI: setup_cache on
that parameter point, then one setup, every method and the teardown. (asv itself gives each
method and repeat a fresh setup; sharing one here is what keeps this file short.) No timing is
asserted: performance lives in asv itself.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PREFIXES = ("time_", "timeraw_", "mem_", "peakmem_", "track_")


def _modules() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def _first_params(obj) -> tuple:
    params = getattr(obj, "params", None)
    if params is None:
        return ()
    names = getattr(obj, "param_names", None) or []
    if len(names) <= 1 and not (params and isinstance(params[0], (list, tuple))):
        params = [params]
    return tuple(values[0] for values in params)


def _benchmarks() -> list:
    """One entry per benchmark class (its methods share one setup_cache, as in asv) or function."""
    sys.path.insert(0, str(BENCH_DIR.parent))
    found = []
    for module_name in _modules():
        module = importlib.import_module(f"benchmarks.{module_name}")
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) and any(a.startswith(PREFIXES) for a in vars(obj)):
                found.append(pytest.param(module_name, name, id=f"{module_name}.{name}"))
            elif inspect.isfunction(obj) and name.startswith(PREFIXES):
                found.append(pytest.param(module_name, name, id=f"{module_name}.{name}"))
    return found


def test_every_benchmark_file_defines_benchmarks():
    assert _modules(), "no benchmarks found"
    names = {p.values[0] for p in _benchmarks()}
    assert names == set(_modules()), f"files without benchmarks: {set(_modules()) - names}"


def _on_first_params(cls):
    """`cls` with its parameter grid cut to the first value of each parameter: a
    `setup_cache` that loops over `self.params` (asv calls it once for the whole grid) then
    measures only the point the methods are called on, not every engine and mode."""
    params = getattr(cls, "params", None)
    if params is None:
        return cls
    if params and isinstance(params[0], (list, tuple)):
        first = type(params)([values[:1] for values in params])
    else:
        first = params[:1]
    return type(cls.__name__, (cls,), {"params": first, "__module__": cls.__module__})


@pytest.mark.parametrize("module_name,name", _benchmarks())
def test_benchmark_runs_once(module_name, name):
    """setup_cache once, then one instance and one setup shared by every method (asv gives
    each method a fresh setup; what a setup builds here, encryption keys or a DP model with
    its warm-up steps, was built once per method and made this the slowest test file)."""
    obj = getattr(importlib.import_module(f"benchmarks.{module_name}"), name)
    if inspect.isfunction(obj):
        obj(*_first_params(obj))
        return
    params = _first_params(obj)
    cls = _on_first_params(obj)
    cached = (cls().setup_cache(),) if hasattr(cls, "setup_cache") else ()
    args = cached + params
    methods = sorted(a for a in vars(obj) if a.startswith(PREFIXES))
    assert methods, f"{name} has no benchmark methods"
    bench = cls()
    if hasattr(bench, "setup"):
        try:
            bench.setup(*args)
        except NotImplementedError as exc:   # asv's way of skipping a benchmark here
            pytest.skip(f"{name}.setup: {exc}")
    try:
        skipped = []
        for method in methods:
            try:
                result = getattr(bench, method)(*args)
            except NotImplementedError as exc:   # asv reports such a method as skipped (n/a)
                skipped.append(f"{method}: {exc}")
                continue
            if method.startswith("track_"):
                assert result is not None and result == result, f"{name}.{method} tracked no number"
        if len(skipped) == len(methods):
            pytest.skip(f"{name}: every method skipped here ({'; '.join(skipped)})")
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*args)


def test_first_params_cut_keeps_the_first_point():
    """The grid cut above keeps exactly the point `_first_params` calls the methods on."""
    class Grid:
        params = (["a", "b"], [1, 2])

    class Flat:
        params = ["x", "y"]

    assert _on_first_params(Grid).params == (["a"], [1]) and _first_params(Grid) == ("a", 1)
    assert _on_first_params(Flat).params == ["x"] and _first_params(Flat) == ("x",)
    assert Grid.params == (["a", "b"], [1, 2])          # the benchmark class itself is untouched


def test_parameter_combinations_are_finite():
    """asv runs the Cartesian product of params; keep each benchmark's grid small."""
    for p in _benchmarks():
        module_name, name = p.values
        cls = getattr(importlib.import_module(f"benchmarks.{module_name}"), name)
        if not inspect.isclass(cls):
            continue
        params = getattr(cls, "params", None)
        if params is None:
            continue
        grid = params if params and isinstance(params[0], (list, tuple)) else [params]
        assert len(list(itertools.product(*grid))) <= 16, f"{name} has a huge parameter grid"
