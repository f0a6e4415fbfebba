#!/usr/bin/env python3
"""Soak test for a running `edgert serve`: mixed traffic with disconnects, watching the server's
resident memory and KV pool over time.

    scripts/soak.py --socket /run/edgert/edgert.sock --minutes 60
    scripts/soak.py --socket /tmp/s.sock --requests 200        # what the test suite runs

Traffic: completions and chats, streamed or not, greedy and seeded sampling, n > 1, echo with
logprobs, stop strings, a few invalid bodies, and a share of clients that hang up mid-stream.
The server's RSS (VmRSS of its /proc status; the pid comes from SO_PEERCRED of a connection
unless --pid is given; under socket activation that names systemd, so give --pid there) and
the pool usage (/metrics) are printed as it runs. After a warm-up share of the run, with the
server idle, the RSS baseline is taken; the run fails (exit 1) if, once traffic stops and the
server is idle again, RSS grew more than --max-rss-growth over it, any KV block is still owned
by a sequence, or the server answered a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "The history of the printing press", "Write a haiku about the sea.",
    "List three prime numbers:", "Once upon a time, in a small village,",
    "Explain what a paged KV cache is.", "def fibonacci(n):", "The quick brown fox",
    "Translate to French: good morning", "In 1969, the first humans", "Q: What is 2+2?\nA:",
]


@dataclass
class Tally:
    done: int = 0
    ok: int = 0
    client_errors: int = 0  # 4xx, expected for the invalid share
    server_errors: int = 0  # 5xx: a failure
    disconnects: int = 0
    transport_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def server_pid(sock_path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i")))
    finally:
        s.close()
    return pid


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def pool(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "edgert_kv_blocks":
                out[s.labels["state"]] = s.value
            elif s.name in ("edgert_num_requests_running", "edgert_num_requests_waiting"):
                out[s.name.removeprefix("edgert_num_requests_")] = s.value
    return out


def make_request(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any], int | None]:
    """(path, body, chunks after which to hang up or None)."""
    r = rng.random()
    if r < 0.05:  # invalid on purpose
        return "/v1/completions", rng.choice([
            {"prompt": "x", "max_tokens": -1}, {"prompt": 5}, {"messages": "hi"},
            {"prompt": "x", "tools": [{}], "logit_bias": {"1": 5}},
            {"prompt": "x", "temperature": "hot"}]), None
    stream = rng.random() < 0.6
    body: dict[str, Any] = {"max_tokens": rng.randint(1, max_tokens), "stream": stream}
    if rng.random() < 0.5:
        body.update(temperature=0.0)
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    hang_up = rng.randint(1, 8) if stream and rng.random() < 0.25 else None
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=2)
        return "/v1/chat/completions", body, hang_up
    body["prompt"] = rng.choice(PROMPTS) * rng.randint(1, 6)
    x = rng.random()
    if x < 0.15:
        body.update(echo=True, logprobs=2, max_tokens=rng.choice([0, 1, 4]))
    elif x < 0.3:
        body.update(n=2)
    elif x < 0.4:
        body.update(stop=["\n", "."])
    elif x < 0.5:
        body.update(ignore_eos=True)
    return "/v1/completions", body, hang_up


async def one(http: httpx.AsyncClient, rng: random.Random, tally: Tally,
              max_tokens: int) -> None:
    path, body, hang_up = make_request(rng, max_tokens)
    try:
        if body.get("stream"):
            async with http.stream("POST", path, json=body) as resp:
                status = resp.status_code
                if status == 200:
                    chunks = 0
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            chunks += 1
                            if hang_up is not None and chunks >= hang_up:
                                tally.disconnects += 1
                                break  # leaving the block closes the connection mid-stream
                else:
                    await resp.aread()
        else:
            status = (await http.post(path, json=body)).status_code
    except httpx.TransportError:
        tally.transport_errors += 1
        status = 0
    tally.done += 1
    tally.statuses[status] = tally.statuses.get(status, 0) + 1
    if status == 200:
        tally.ok += 1
    elif 400 <= status < 500:
        tally.client_errors += 1
    elif status >= 500:
        tally.server_errors += 1


async def soak(args: argparse.Namespace) -> int:
    pid = args.pid or server_pid(args.socket)
    rng = random.Random(args.seed)
    tally = Tally()
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url="http://localhost", timeout=httpx.Timeout(300.0),
                                 transport=httpx.AsyncHTTPTransport(uds=args.socket,
                                                                    limits=limits)) as http:
        start = time.monotonic()
        peak = 0

        async def reporter() -> None:
            nonlocal peak
            while True:
                rss = rss_kib(pid)
                peak = max(peak, rss)
                p = await pool(http)
                print(f"t={time.monotonic() - start:7.1f}s requests={tally.done:6d} "
                      f"ok={tally.ok} 4xx={tally.client_errors} 5xx={tally.server_errors} "
                      f"hangups={tally.disconnects} rss={rss / 1024:8.1f}MiB "
                      f"blocks used={p.get('used', -1):.0f} cached={p.get('cached', -1):.0f} "
                      f"free={p.get('free', -1):.0f} running={p.get('running', -1):.0f} "
                      f"waiting={p.get('waiting', -1):.0f}", flush=True)
                await asyncio.sleep(args.report_every)

        async def phase(requests: int | None, seconds: float | None) -> None:
            issued = 0
            until = time.monotonic() + seconds if seconds is not None else None

            async def worker() -> None:
                nonlocal issued
                while (time.monotonic() < until) if until is not None else \
                        issued < (requests or 0):
                    issued += 1
                    await one(http, rng, tally, args.max_tokens)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        for _ in range(int(args.wait_ready * 10)):  # a server still loading answers 503
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/ready")).status_code == 200:
                    break
            await asyncio.sleep(0.1)
        else:
            print("FAIL: the server did not become healthy", file=sys.stderr)
            return 1
        rep = asyncio.create_task(reporter())
        # Warm-up, then the baseline at idle, then the rest: idle-to-idle comparison, so
        # transient buffers of in-flight requests count on neither side.
        if args.minutes:
            await phase(None, args.warmup * args.minutes * 60)
        else:
            await phase(round(args.warmup * args.requests), None)
        await wait_idle(http)
        baseline = rss_kib(pid)
        print(f"# warm-up done after {tally.done} requests: RSS baseline "
              f"{baseline / 1024:.1f} MiB", flush=True)
        if args.minutes:
            await phase(None, (1 - args.warmup) * args.minutes * 60)
        else:
            await phase(args.requests - round(args.warmup * args.requests), None)
        rep.cancel()
        p = await wait_idle(http)
        final = rss_kib(pid)
        peak = max(peak, final)
        growth = (final - baseline) / baseline
        ok = growth <= args.max_rss_growth and p.get("used") == 0 and tally.server_errors == 0
        summary = {"requests": tally.done, "ok": tally.ok, "client_errors": tally.client_errors,
                   "server_errors": tally.server_errors, "hangups": tally.disconnects,
                   "transport_errors": tally.transport_errors, "statuses": tally.statuses,
                   "rss_baseline_kib": baseline, "rss_final_kib": final, "rss_peak_kib": peak,
                   "rss_growth": round(growth, 4), "blocks": p,
                   "seconds": round(time.monotonic() - start, 1), "pass": ok}
        print("SUMMARY " + json.dumps(summary), flush=True)
        if not ok:
            print(f"FAIL: rss growth {growth:.1%} (limit {args.max_rss_growth:.0%}), "
                  f"blocks used {p.get('used')}, 5xx {tally.server_errors}", file=sys.stderr)
        return 0 if ok else 1


async def wait_idle(http: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, float]:
    """Every request finished or aborted: then no block may still be owned by a sequence."""
    deadline = time.monotonic() + timeout
    while True:
        p = await pool(http)
        if (p.get("used") == 0 and p.get("running") == 0 and p.get("waiting") == 0) \
                or time.monotonic() > deadline:
            return p
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="the server's Unix socket")
    run = ap.add_mutually_exclusive_group()
    run.add_argument("--minutes", type=float, help="run for this long")
    run.add_argument("--requests", type=int, default=200, help="or this many requests (200)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48,
                    help="outputs are 1..this many tokens (48)")
    ap.add_argument("--pid", type=int, help="server pid (default: from SO_PEERCRED)")
    ap.add_argument("--warmup", type=float, default=0.25,
                    help="share of the run before the RSS baseline is taken (0.25)")
    ap.add_argument("--max-rss-growth", type=float, default=0.05,
                    help="allowed RSS growth over the baseline (0.05)")
    ap.add_argument("--report-every", type=float, default=5.0, help="seconds between lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-ready", type=float, default=300.0,
                    help="seconds to wait for /ready 200 before starting (300)")
    args = ap.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
