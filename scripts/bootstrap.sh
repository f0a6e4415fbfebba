#!/usr/bin/env bash
# Create ./.venv and install edgert with the given extras (default: export,dev).
# Idempotent: a second run only checks that the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export,dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.edgert-installed-${extras//,/-}"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch (only in the dev extra) is pinned to the CPU build so pip never pulls a CUDA wheel.
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
