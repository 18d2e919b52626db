#!/usr/bin/env bash
# Quickstart 2: set up .venv and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report render check needs Debian's chromium; install it where we may (CI runs as root).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "note: chromium could not be installed; the render test will be skipped"
fi
# The MPC namespaces test needs OpenVPN (the party links' tunnels) and tcpdump (its capture).
if { ! command -v openvpn || ! command -v tcpdump; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends openvpn tcpdump >/dev/null) \
    || echo "note: openvpn/tcpdump could not be installed; the MPC namespaces test will fail"
fi
# The linter first (pyflakes rules and syntax errors; see [tool.ruff] in pyproject.toml).
.venv/bin/python -m ruff check --quiet . || { echo "ruff found problems (above)" >&2; exit 1; }
# Two workers (TEST_WORKERS=0 runs in this process): much of a test's time is a fresh
# interpreter importing torch, or waiting on worker, party and enclave processes, which two
# lanes on two cores overlap. A file's tests stay on one worker (tests/file_scheduling.py), so its
# module-scoped runs are built once; the files start in the order conftest.py gives (longest
# first), not xdist's order by test count. TEST_TIMELINE=FILE records where each test ran and
# for how long; `.venv/bin/python -m tests.timeline FILE --simulate` prints the two workers' plan.
workers=${TEST_WORKERS:-2}
if [ "$workers" != 0 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
  set -- -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
elif [ "$workers" != 0 ]; then
  echo "note: pytest-xdist is missing (bash scripts/setup.sh installs it); running in one process"
fi
# --durations: the slowest tests are listed at the end, so a slow newcomer is seen in CI's log.
exec .venv/bin/python -m pytest -q --durations=25 "$@"
