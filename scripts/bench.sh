#!/usr/bin/env bash
# Quickstart 1: set up .venv and run the default benchmark (offline, synthetic data).
# Extra arguments go to `python -m suite run`, e.g. --quick or --backends plaintext,mpc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m suite run "$@"
