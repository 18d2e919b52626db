"""Where a test run's time went, per xdist worker: which file ran where, when, and when each
worker's last test ended (the two should end together; a long file started last on one
worker while the other idles shows here).

    TEST_TIMELINE=/tmp/tl.jsonl bash scripts/test.sh     # tests/conftest.py records each test
    .venv/bin/python -m tests.timeline /tmp/tl.jsonl      # the plan as it ran
    .venv/bin/python -m tests.timeline /tmp/tl.jsonl --simulate   # and as conftest's order would run it

`--simulate` replays the measured test times through xdist's LoadScope policy (a worker is
given the next unit when at most 2 of its tests are pending) with the unit order of
tests/conftest.py, so a new LONG_FILES order can be judged without running the suite again.
`--per-file` prints each file's tests, summed wall seconds and CPU, longest first; `--suggest`
replays the order that starts the files longest first (a LONG_FILES candidate).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def record(path: str, worker: str, nodeid: str, start: float, cpu_start: float) -> None:
    """One test's line (appended: both workers write the same file, a line each, atomically)."""
    line = json.dumps({"worker": worker, "nodeid": nodeid, "start": start, "end": time.time(),
                       "cpu_s": cpu_seconds() - cpu_start}) + "\n"
    with open(path, "a") as fh:
        fh.write(line)


def units(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped per worker into consecutive runs of one file, in the order they ran."""
    per: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["start"]):
        file = r["nodeid"].split("::", 1)[0]
        runs = per[r["worker"]]
        if runs and runs[-1]["file"] == file:
            runs[-1].update(end=r["end"], cpu_s=runs[-1]["cpu_s"] + r["cpu_s"], tests=runs[-1]["tests"] + 1)
        else:
            runs.append({"file": file, "start": r["start"], "end": r["end"], "cpu_s": r["cpu_s"], "tests": 1})
    return per


def describe(rows: list[dict], top: int = 12) -> str:
    t0 = min(r["start"] for r in rows)
    out = []
    for worker, runs in sorted(units(rows).items()):
        busy = sum(u["end"] - u["start"] for u in runs)
        cpu = sum(u["cpu_s"] for u in runs)
        out.append(f"{worker}: last test ended at {runs[-1]['end'] - t0:.0f} s, busy {busy:.0f} s, "
                   f"CPU {cpu:.0f} s (its own process and waited-for children)")
        for u in sorted(runs, key=lambda u: u["start"] - u["end"])[:top]:
            out.append(f"  {u['start'] - t0:6.0f} -> {u['end'] - t0:6.0f} s  {u['end'] - u['start']:5.0f} s"
                       f"  cpu {u['cpu_s']:5.0f} s  {u['tests']:3d} tests  {u['file']}")
    return "\n".join(out)


def per_file(rows: list[dict]) -> list[tuple[str, int, float, float]]:
    """(file, tests, summed wall seconds, summed CPU seconds), longest first."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for r in rows:
        t = totals[r["nodeid"].split("::", 1)[0]]
        t[0] += 1
        t[1] += r["end"] - r["start"]
        t[2] += r["cpu_s"]
    return sorted(((f, n, w, c) for f, (n, w, c) in totals.items()), key=lambda x: -x[2])


def longest_first(rows: list[dict]) -> tuple[str, ...]:
    """File names in the order of their units' measured seconds, longest unit first (a file
    whose tests join another file's unit counts with it; a spread file by its longest test)."""
    longest: dict[str, float] = {}
    for unit, tests in queue(rows, order=()):
        name = Path(unit.split("::", 1)[0]).name
        longest[name] = max(longest.get(name, 0.0), sum(tests))
    return tuple(sorted(longest, key=lambda n: -longest[n]))


def queue(rows: list[dict], order: tuple[str, ...] | None = None) -> list[tuple[str, list[float]]]:
    """The work units in the order conftest.py (or `order`, a LONG_FILES candidate) and
    file_scheduling.py give them, each with its tests' measured seconds in the order they ran."""
    from tests.conftest import LONG_FILES, SPREAD_FILES
    from tests.file_scheduling import file_scope
    from tests.shared_runs import SHARED_FILES, SHARED_LABELS

    first = LONG_FILES if order is None else order

    def rank(nodeid: str) -> tuple:
        name = Path(nodeid.split("::", 1)[0]).name
        return (first.index(name) if name in first else len(first), nodeid.split("::", 1)[0])

    ordered = sorted(sorted(rows, key=lambda r: r["start"]), key=lambda r: rank(r["nodeid"]))
    found: dict[str, list[float]] = {}
    for r in ordered:
        found.setdefault(file_scope(r["nodeid"], SPREAD_FILES, SHARED_LABELS, SHARED_FILES), []).append(r["end"] - r["start"])
    return list(found.items())


def simulate(units_in_order: list[tuple[str, list[float]]], workers: int = 2) -> list[dict]:
    """Each worker's units and the time its last test ends, under LoadScope's policy."""
    pending = list(units_in_order)
    lanes = [{"clock": 0.0, "todo": [], "units": []} for _ in range(workers)]

    def assign(lane):
        unit, tests = pending.pop(0)
        lane["todo"] += tests
        lane["units"].append(unit)

    for lane in lanes:                            # one unit each, then a second where it is short
        if pending:
            assign(lane)
    for lane in lanes:
        if pending and len(lane["todo"]) <= 2:
            assign(lane)
    while any(lane["todo"] for lane in lanes):
        lane = min((lane for lane in lanes if lane["todo"]), key=lambda lane: lane["clock"] + lane["todo"][0])
        lane["clock"] += lane["todo"].pop(0)
        if pending and len(lane["todo"]) <= 2:
            assign(lane)
    return [{"end": lane["clock"], "units": lane["units"]} for lane in lanes]


if __name__ == "__main__":
    lines = Path(sys.argv[1]).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    print(describe(rows))
    if "--per-file" in sys.argv:
        for file, n, wall, cpu in per_file(rows):
            print(f"{wall:7.0f} s  cpu {cpu:6.0f} s  {n:3d} tests  {file}")
    plans = [("conftest's order", None)] if "--simulate" in sys.argv else []
    if "--suggest" in sys.argv:
        plans.append(("longest first", longest_first(rows)))
        print("longest first:", ", ".join(plans[-1][1]))
    for what, order in plans:
        for k, lane in enumerate(simulate(queue(rows, order))):
            print(f"simulated worker {k} ({what}): ends at {lane['end']:.0f} s; first units: "
                  + ", ".join(Path(u.split('::', 1)[0]).name for u in lane["units"][:8]))
