"""Extra rows are typed: conditions are columns, and a row that hides one in its name fails."""

from __future__ import annotations

import pytest

from suite.extra_rows import ExtraRowError, typed_extra_rows
from suite.metrics import MetricSpec
from suite.results import ResultRow


def _row(**kw):
    return {"metric": "projected_latency_per_image", "value": 1.5, "unit": "s", "higher_is_better": False, **kw}


def test_qualified_row_passes_and_is_marked_projected():
    (row,) = typed_extra_rows("mpc", [_row(network="wan")])
    assert row["network"] == "wan" and row["estimate"] == "projected"
    assert set(row) <= set(ResultRow.__dataclass_fields__), "every field reaches the results"


@pytest.mark.parametrize("bad,match", [
    (_row(metric="projected_latency_per_image_wan"), "packs a qualifier"),
    (_row(metric="auroc_round3"), "packs a qualifier"),
    (_row(network="5g"), "network must be one of"),
    (_row(estimate="guessed"), "estimate must be one of"),
    (_row(round="3"), "round must be an integer"),
    (_row(round=True), "round must be an integer"),
    (_row(phase="later"), "phase must be one of"),
    (_row(speed="fast"), "unknown field"),
    ({"metric": "x", "value": 1}, "needs a unit and a direction"),
    ({"metric": "Bad-Name", "value": 1, "unit": "", "higher_is_better": None}, "lower_snake_case"),
])
def test_untyped_rows_are_refused(bad, match):
    with pytest.raises(ExtraRowError, match=match):
        typed_extra_rows("mpc", [bad])


def test_declared_metrics_fill_unit_and_refuse_others():
    declared = {"party_peak_rss": MetricSpec("party_peak_rss", "bytes", False, None, "peak RSS of a party")}
    (row,) = typed_extra_rows("mpc", [{"metric": "party_peak_rss", "value": 3, "party": "dealer"}], declared)
    assert row["unit"] == "bytes" and row["higher_is_better"] is False
    with pytest.raises(ExtraRowError, match="not among the backend's declared"):
        typed_extra_rows("mpc", [_row()], declared)
