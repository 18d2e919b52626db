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
  # installs; its real dependencies come with the [mpc] extra. See backends/mpc/crypten_compat.py.
  .venv/bin/python -m pip install -q --no-deps "crypten==0.4.1"
  echo "$want" > "$stamp"
fi

# Second MPC engine (mpc:engine=spu): SecretFlow SPU 0.9.5 needs numpy<2 and jax<=0.4.34, which
# conflict with .venv, so its parties run from their own .venv-spu/ (Python 3.11, no torch; see
# backends/mpc/spu_engine.py). A failure here is a warning: every other backend still works, and
# `mpc:engine=spu` then says how to retry.
# Its own stamp: re-runs are cheap, and changing SPU_REQUIREMENTS reinstalls it.
SPU_REQUIREMENTS="spu==0.9.5 numpy<2 jax<=0.4.34"
spu_stamp=.venv-spu/.spu-installed
spu_want=$(echo "$SPU_REQUIREMENTS" | sha256sum | cut -c1-16)
if [ "$(cat "$spu_stamp" 2>/dev/null)" != "$spu_want" ]; then
  SPU_PY=${SPU_PYTHON:-}
  if [ -z "$SPU_PY" ]; then
    for cand in /usr/bin/python3.11 python3.11; do
      if command -v "$cand" >/dev/null 2>&1; then SPU_PY=$cand; break; fi
    done
  fi
  if [ -z "$SPU_PY" ]; then
    echo "WARNING: no python3.11 found: the SPU engine (mpc:engine=spu) is unavailable;" \
         "set SPU_PYTHON=/path/to/python3.11 and re-run scripts/setup.sh" >&2
  else
    echo "installing SecretFlow SPU into .venv-spu with $($SPU_PY --version) (first time: a few minutes)"
    # shellcheck disable=SC2086
    if { [ -x .venv-spu/bin/python ] || "$SPU_PY" -m venv .venv-spu; } \
        && .venv-spu/bin/python -m pip install -q --upgrade pip \
        && .venv-spu/bin/python -m pip install -q $SPU_REQUIREMENTS \
        && .venv-spu/bin/python -c "import spu, spu.libspu, jax, numpy; assert numpy.__version__ < '2'"; then
      echo "$spu_want" > "$spu_stamp"
    else
      echo "WARNING: installing SPU into .venv-spu failed: the SPU engine (mpc:engine=spu) is" \
           "unavailable; every other backend is unaffected. Retry with: bash scripts/setup.sh" >&2
    fi
  fi
fi

# Whole-network FHE engine (he:engine=desilo): desilofhe 2.0.0 (CKKS with bootstrapping, CPU)
# runs its parties from their own .venv-fhe/ (numpy + desilofhe, no torch; see
# backends/he/fhe_engine.py), so nothing in .venv changes. A failure here is a warning: every
# other backend still works, and `he:engine=desilo` then says how to retry.
FHE_REQUIREMENTS="desilofhe==2.0.0 numpy>=1.26"
fhe_stamp=.venv-fhe/.fhe-installed
fhe_want=$(echo "$FHE_REQUIREMENTS" | sha256sum | cut -c1-16)
if [ "$(cat "$fhe_stamp" 2>/dev/null)" != "$fhe_want" ]; then
  FHE_PY=${FHE_PYTHON:-}
  if [ -z "$FHE_PY" ]; then
    for cand in /usr/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 python3.12 /usr/bin/python3.11 python3.11; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys' >/dev/null 2>&1; then FHE_PY=$cand; break; fi
    done
  fi
  if [ -z "$FHE_PY" ]; then
    echo "WARNING: no python3.12 found: the FHE engine (he:engine=desilo) is unavailable;" \
         "set FHE_PYTHON=/path/to/python3.12 and re-run scripts/setup.sh" >&2
  else
    echo "installing desilofhe into .venv-fhe with $($FHE_PY --version) (first time: a minute)"
    # shellcheck disable=SC2086
    if { [ -x .venv-fhe/bin/python ] || "$FHE_PY" -m venv .venv-fhe; } \
        && .venv-fhe/bin/python -m pip install -q --upgrade pip \
        && .venv-fhe/bin/python -m pip install -q $FHE_REQUIREMENTS \
        && .venv-fhe/bin/python -c "import desilofhe, numpy; desilofhe.Engine(max_level=3)"; then
      echo "$fhe_want" > "$fhe_stamp"
    else
      echo "WARNING: installing desilofhe into .venv-fhe failed: the FHE engine (he:engine=desilo) is" \
           "unavailable; every other backend is unaffected. Retry with: bash scripts/setup.sh" >&2
    fi
  fi
fi
