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
exec .venv/bin/python -m pytest -q "$@"
