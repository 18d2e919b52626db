"""Training rows lead with what they cost next to their control: the harness-measured
training wall time (fit phase) divided by the same of the control the row is compared with
(a dp row's non-private control, for instance), under the same training budget."""

from __future__ import annotations

from typing import Any

from suite.results import ResultRow


def fit_time_ratio_rows(base: dict[str, Any], part: dict[str, Any], ref_part: dict[str, Any] | None,
                        ref_id: str) -> list[ResultRow]:
    """One `fit_time_ratio` row (no row when either fit time is missing)."""
    mine = (part.get("timings") or {}).get("fit_s")
    theirs = ((ref_part or {}).get("timings") or {}).get("fit_s")
    if not mine or not theirs:
        return []
    note = (f"training wall time (fit phase, measured by the harness) / that of its control "
            f"{ref_id}, same training budget")
    scopes = (("this row's", part.get("fit_scope")),
              ("the control's", (ref_part or {}).get("fit_scope")))
    for who, scope in scopes:
        if scope:
            note += f"; {who} fit phase also holds {scope}"
    return [ResultRow(**base, metric="fit_time_ratio", value=float(mine) / float(theirs), unit="x",
                      higher_is_better=False, reference=ref_id, phase="fit", note=note)]
