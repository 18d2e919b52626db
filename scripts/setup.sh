#!/usr/bin/env bash
# Create .venv/ at the repo root (if missing) and install the suite with every extra.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: Python 3.11+ is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

stamp=.venv/.suite-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the suite and its extras into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch>=2.14 comes from the registry with its matching torchvision (see pyproject.toml).
  .venv/bin/python -m pip install -q -e ".[all]"
  # CrypTen 0.4.1 (last release) declares the deprecated `sklearn` package, which no longer
  # installs; its real dependencies come with the [mpc] extra. See backends/crypten_compat.py.
  .venv/bin/python -m pip install -q --no-deps "crypten==0.4.1"
  echo "$want" > "$stamp"
fi
