#!/usr/bin/env bash
# The GPU check (issue 9): `scripts/gpu_check.sh --prepare` here, on a CPU machine, makes the
# tiny bundles that travel with the checkout (.cache/gpu_check, git-ignored); `scripts/gpu_check.sh
# --run [--python PY]` on the GPU machine (no network needed) runs the backend contract suite,
# the engine build and the offline bench for every backend that can run there, and writes
# gpu_check_report.json. See scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --prepare) shift; scripts/bootstrap.sh export,dev; exec .venv/bin/python scripts/gpu_check.py prepare "$@" ;;
  --run) shift; exec "${PYTHON:-python3}" scripts/gpu_check.py run "$@" ;;
  *) echo "usage: scripts/gpu_check.sh --prepare | --run [--python PY] [--device PROFILE]" >&2; exit 2 ;;
esac
