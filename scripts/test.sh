#!/usr/bin/env bash
# The test command of the README: set up ./.venv, lint, run the suite (slow peer comparisons are
# skipped by default; pass -m slow to run them). The real model is fetched into ./.cache once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh export,dev
.venv/bin/ruff check edgert export tests scripts
scripts/system_deps.sh  # sshd and rsync for tests/test_deploy.py
exec .venv/bin/python -m pytest "$@"
