"""The "× ctrl" row compares two harness-timed fit phases; when one of them holds more than
training (the Flower simulation engine starts inside its run), the row's note must say so."""

from backends.fl.backend import FLBackend
from suite.control_ratio import fit_time_ratio_rows

BASE = dict(backend="fl", backend_id="fl", track="training", dataset="d")


def _part(fit_s, scope=""):
    return {"timings": {"fit_s": fit_s}, "fit_scope": scope}


def test_the_ratio_note_names_what_else_a_fit_phase_holds():
    (row,) = fit_time_ratio_rows(BASE, _part(30.0, "the engine's start-up"), _part(10.0), "ctrl")
    assert row.value == 3.0
    assert "this row's fit phase also holds the engine's start-up" in row.note
    (plain,) = fit_time_ratio_rows(BASE, _part(30.0), _part(10.0), "ctrl")   # control: no scope
    assert "also holds" not in plain.note


def test_federated_simulation_declares_its_engine_start_up_and_centralised_nothing():
    fed = FLBackend(FLBackend.Options(mode="federated", engine="simulation"))
    assert "simulation engine's start-up" in fed.fit_scope()
    assert FLBackend(FLBackend.Options(mode="centralised")).fit_scope() == ""
