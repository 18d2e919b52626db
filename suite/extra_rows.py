"""Backend-specific rows, typed: a metric name says what is measured, never under which
conditions. Conditions are qualifier columns (party, phase, network, estimate, round, ...).

A backend may declare its metrics (`Backend.extra_metrics`: name -> MetricSpec); declared
rows then take their unit and direction from the declaration, and an undeclared name is an
error. Every row is checked here before it reaches the results, so a name that packs a
qualifier (`projected_latency_per_image_wan`) or a misspelt qualifier fails the backend's
job loudly instead of being parsed by substring later.
"""

from __future__ import annotations

import re
from typing import Any

from suite.metrics import MetricSpec

QUALIFIERS = {"party", "phase", "network", "estimate", "round", "view", "site", "label", "artifact"}
DESCRIPTIVE = {"note", "n", "ci_low", "ci_high", "ci_method", "status", "error"}
REQUIRED = {"metric", "value"}
ESTIMATES = ("measured", "projected", "simulated")
NETWORKS = ("loopback", "lan", "wan")
PHASES = ("setup", "fit", "online", "audit", "teardown")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# qualifier values that must be columns, not name parts
PACKED = re.compile(r"_(lan|wan|loopback|projected|simulated|measured|round\d+)($|_)")


class ExtraRowError(ValueError):
    """A backend emitted a row the results cannot hold honestly."""


def typed_extra_rows(backend_name: str, rows: list[dict[str, Any]],
                     declared: dict[str, MetricSpec] | None = None) -> list[dict[str, Any]]:
    """Validated copies of `rows`, with unit and direction filled from the declaration."""
    out = []
    for row in rows:
        row = dict(row)
        where = f"{backend_name}: extra row {row.get('metric')!r}"
        missing = REQUIRED - set(row)
        if missing:
            raise ExtraRowError(f"{where} lacks {sorted(missing)}")
        unknown = set(row) - REQUIRED - QUALIFIERS - DESCRIPTIVE - {"unit", "higher_is_better"}
        if unknown:
            raise ExtraRowError(f"{where} has unknown field(s) {sorted(unknown)}; qualifiers are "
                                f"{sorted(QUALIFIERS)}")
        name = row["metric"]
        if not NAME.match(str(name)):
            raise ExtraRowError(f"{where}: a metric name is lower_snake_case")
        if PACKED.search(name):
            raise ExtraRowError(f"{where}: the name packs a qualifier; use the network/estimate/round "
                                f"columns instead")
        if declared:
            if name not in declared:
                raise ExtraRowError(f"{where} is not among the backend's declared extra metrics "
                                    f"({', '.join(sorted(declared))})")
            row.setdefault("unit", declared[name].unit)
            row.setdefault("higher_is_better", declared[name].higher_is_better)
        if "unit" not in row or "higher_is_better" not in row:
            raise ExtraRowError(f"{where} needs a unit and a direction (higher_is_better), or a "
                                f"declaration in extra_metrics")
        _check_choice(where, row, "estimate", ESTIMATES)
        _check_choice(where, row, "network", NETWORKS)
        _check_choice(where, row, "phase", PHASES)
        if row.get("round") is not None and (isinstance(row["round"], bool) or not isinstance(row["round"], int)):
            raise ExtraRowError(f"{where}: round must be an integer, got {row['round']!r}")
        if row.get("network") and not row.get("estimate"):
            row["estimate"] = "projected"     # a network profile other than the one measured on
        out.append(row)
    return out


def _check_choice(where: str, row: dict, key: str, allowed: tuple[str, ...]) -> None:
    value = row.get(key)
    if value is not None and value not in allowed:
        raise ExtraRowError(f"{where}: {key} must be one of {', '.join(allowed)}, got {value!r}")
