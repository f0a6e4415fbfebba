#!/usr/bin/env bash
# edgert against llama.cpp's server on the same cores, in one run (issue 11). Slow, never in CI.
#
#   scripts/bench_vs_llamacpp.sh [--bundles fp32,int8,int4] [--requests 48] [--concurrency 1,16]
#
# 1. builds llama.cpp's `llama-server` (and `llama-bench`) natively from the llama-cpp-python
#    sdist on the package index, once, into .cache/llamacpp (git-ignored);
# 2. fetches SmolLM2-135M-Instruct (its Q4_1 GGUF) and exports the edgert bundles asked for;
# 3. for each bundle: starts llama-server (-t 2 -np 16 -c 16384) on the GGUF and `edgert serve`
#    (defaults, its pool sized to hold the same 16,384 tokens: --kv-tokens) on the bundle, one
#    after the other on the same cores, and runs the same streamed completions workload against
#    each (`edgert bench`: token-id prompts, ignore_eos so both emit exactly the drawn lengths),
#    recording TTFT / TPOT / throughput, each server's peak RSS, and the share of the cores
#    other processes and the hypervisor's steal took meanwhile (SHARED above 5%);
# 4. TPOT of one stream after prompts of 256 / 1k / 4k / 8k tokens, both servers (--context-curve,
#    on the last bundle or --curve-bundle), and the slope of each in ms per 1k tokens;
# 5. prints the ratios edgert / llama.cpp and writes .cache/bench_vs_llamacpp/report.json and a
#    plot. The CPU flags are printed first: the figures depend on them (AVX2 vs AVX-512 VNNI).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/bench_vs_llamacpp.py "$@"
