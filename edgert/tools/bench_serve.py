"""`edgert bench --socket PATH`: a load generator for a running server.

For each concurrency level it sends the same kind of traffic: prompts of real token ids (windows
of a tokenized random-word corpus, so lengths are exact and prefixes rarely repeat) with lengths
drawn from a distribution, `ignore_eos` so outputs have exactly the drawn length, streamed so the
first token's arrival is seen. Closed loop by default (each of the `c` workers sends its next
request when the last one ends); with --rate, arrivals follow a Poisson process and wait for a
free slot. TTFT is measured to the first chunk that carries a token, TPOT is the rest of the
request's time divided by its remaining tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_WORDS = ("the of and to in is was for on that with as by at from his her an which are this "
          "be had not but have one were they all their there been has when who more will would "
          "into time out about than them some only other could its made these two may first "
          "then do any like over such our man me even most after also did many before must "
          "through back years where much your way well down should because each just those "
          "people how too little state good very make world still own see men work long get "
          "here between both life being under never day same another know while last might us "
          "great old year off come since against go came right used take three river engine "
          "memory block socket board kernel signal stream token model cache pool batch")


@dataclass
class Sample:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    duration: float
    output_tokens: int
    ttft: dict[str, float] = field(default_factory=dict)  # p50/p90/p99, seconds
    tpot: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", default="1,4,16,32",
                   help="comma-separated in-flight request counts to test (1,4,16,32)")
    g.add_argument("--requests", type=int, default=64, help="requests per level (64)")
    g.add_argument("--rate", type=float, default=None,
                   help="Poisson arrival rate in requests/s (default: closed loop)")
    g.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (128)")
    g.add_argument("--output-len", type=int, default=128, help="mean output tokens (128)")
    g.add_argument("--len-dist", choices=["fixed", "uniform", "exponential", "mixed"],
                   default="uniform",
                   help="prompt length distribution around the mean (uniform: +-50%%; mixed: "
                        "one prompt in 16 is 16x longer); outputs use it too, except mixed")
    g.add_argument("--seed", type=int, default=0,
                   help="draws the prompts and lengths: the same seed, the same workload")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    g.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    g.add_argument("--plot", metavar="PNG",
                   help="draw latency vs concurrency (needs matplotlib; skipped if absent)")


def draw_length(rng: random.Random, mean: int, dist: str) -> int:
    """fixed; uniform (+-50%); exponential; mixed: the mean, but one in 16 is 16x longer (the
    workload where one long sequence would pad the others' decode)."""
    if dist == "fixed":
        return max(1, mean)
    if dist == "uniform":
        return max(1, rng.randint(mean // 2, mean + mean // 2))
    if dist == "mixed":
        return max(1, mean * 16 if rng.random() < 1 / 16 else mean)
    return max(1, int(rng.expovariate(1.0 / mean)))


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


async def _one(http: Any, prompt: list[int], max_tokens: int) -> Sample:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    chunks = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return Sample(False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return Sample(False, error=str(event["error"].get("message")))
                if event.get("choices") and event["choices"][0].get("text"):
                    chunks += 1  # a peer that sends no usage: one token per chunk
                    if first is None:
                        first = time.perf_counter()
                if event.get("usage"):
                    usage = event["usage"]
    except Exception as e:  # a load generator reports failures, it does not stop on them
        return Sample(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    n = int(usage.get("completion_tokens", chunks))
    ttft = None if first is None else first - t0
    tpot = (end - first) / (n - 1) if first is not None and n > 1 else None
    return Sample(True, int(usage.get("prompt_tokens", len(prompt))), n, ttft, tpot, end - t0)


async def _level(http: Any, concurrency: int, work: list[tuple[list[int], int]],
                 rate: float | None, rng: random.Random) -> LevelResult:
    slots = asyncio.Semaphore(concurrency)
    samples: list[Sample] = []

    async def run(prompt: list[int], max_tokens: int) -> None:
        async with slots:
            samples.append(await _one(http, prompt, max_tokens))

    t0 = time.perf_counter()
    tasks = []
    for prompt, max_tokens in work:
        tasks.append(asyncio.create_task(run(prompt, max_tokens)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    good = [s for s in samples if s.ok]
    return LevelResult(
        concurrency, len(samples), len(good), duration, sum(s.output_tokens for s in good),
        _pcts([s.ttft for s in good if s.ttft is not None]),
        _pcts([s.tpot for s in good if s.tpot is not None]),
        _pcts([s.e2e for s in good if s.e2e is not None]),
        sorted({s.error for s in samples if s.error})[:5])


def corpus_text(rng: random.Random, prompt_len: int) -> str:
    """Random words, enough for prompts of `prompt_len` tokens drawn from anywhere in it."""
    words = _WORDS.split()
    return " ".join(rng.choice(words) for _ in range(3 * prompt_len + 512))


async def run_bench(target: str, concurrency: list[int], requests: int, prompt_len: int,
                    output_len: int, dist: str = "uniform", rate: float | None = None,
                    seed: int = 0, timeout: float = 600.0, corpus: list[int] | None = None,
                    max_model_len: int | None = None, keepalive: bool = True
                    ) -> list[LevelResult]:
    """`corpus` (token ids) and `max_model_len` given: the target is not asked for them (a
    peer server without edgert's /v1/tokenize gets the very prompts edgert got). `keepalive`
    False: a connection per request (a peer that closes idle connections would otherwise
    fail the requests that reuse one)."""
    import httpx

    from edgert.client import _target

    base_url, uds = _target(target)
    limits = httpx.Limits(max_connections=max(concurrency) + 4,
                          max_keepalive_connections=None if keepalive else 0)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout, connect=10),
                                 transport=httpx.AsyncHTTPTransport(uds=uds, limits=limits)
                                 ) as http:
        if max_model_len is None:
            resp = await http.get("/v1/models")
            resp.raise_for_status()
            max_model_len = int(resp.json()["data"][0].get("max_model_len") or 2048)
        rng = random.Random(seed)
        if corpus is None:
            resp = await http.post("/v1/tokenize", json={"prompt": corpus_text(rng, prompt_len),
                                                         "add_special_tokens": False})
            resp.raise_for_status()
            corpus = resp.json()["tokens"]
        results = []
        for c in concurrency:
            work = []
            for _ in range(requests):
                out = draw_length(rng, output_len, "fixed" if dist == "mixed" else dist)
                n = min(draw_length(rng, prompt_len, dist), len(corpus) - 1,
                        max_model_len - out - 1)
                n = max(1, n)
                start = rng.randrange(0, len(corpus) - n)
                work.append((corpus[start:start + n], max(1, min(out, max_model_len - n))))
            results.append(await _level(http, c, work, rate, rng))
    return results


def format_table(results: list[LevelResult]) -> str:
    def ms(d: dict[str, float], k: str) -> str:
        return f"{d[k] * 1000:8.1f}" if k in d else "     n/a"

    head = (f"{'conc':>4} {'ok/req':>8} {'TTFT p50':>8} {'p90':>8} {'p99':>8} {'TPOT p50':>8} "
            f"{'p90':>8} {'p99':>8} {'E2E p50':>8} {'p90':>8} {'p99':>8} {'out tok/s':>9}")
    lines = [head, "(latencies in ms)"]
    for r in results:
        lines.append(
            f"{r.concurrency:>4} {f'{r.ok}/{r.requests}':>8} {ms(r.ttft, 'p50')} "
            f"{ms(r.ttft, 'p90')} {ms(r.ttft, 'p99')} {ms(r.tpot, 'p50')} {ms(r.tpot, 'p90')} "
            f"{ms(r.tpot, 'p99')} {ms(r.e2e, 'p50')} {ms(r.e2e, 'p90')} {ms(r.e2e, 'p99')} "
            f"{r.output_tokens_per_s:9.1f}")
        lines.extend(f"     error: {e}" for e in r.errors)
    return "\n".join(lines)


def plot(results: list[LevelResult], path: str) -> bool:
    """Latency percentiles and throughput vs concurrency; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r.concurrency for r in results]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, name in zip(axes[:3], ("ttft", "tpot", "e2e")):
        for q in ("p50", "p90", "p99"):
            ax.plot(xs, [getattr(r, name).get(q, float("nan")) * 1000 for r in results],
                    marker="o", label=q)
        ax.set_title(f"{name.upper()} (ms)")
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.legend()
    axes[3].plot(xs, [r.output_tokens_per_s for r in results], marker="o")
    axes[3].set_title("output tokens/s")
    axes[3].set_xlabel("concurrency")
    axes[3].set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path)
    return True


def bench_from_args(args: argparse.Namespace) -> int:
    if not args.socket and not args.url:
        print("edgert bench: give --socket PATH (or --url http://HOST:PORT)", file=sys.stderr)
        return 2
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(f"edgert bench: --concurrency {args.concurrency!r}: expected e.g. 1,4,16",
              file=sys.stderr)
        return 2
    if not levels or min(levels) < 1 or args.requests < 1:
        print("edgert bench: concurrency levels and --requests must be >= 1", file=sys.stderr)
        return 2
    results = asyncio.run(run_bench(args.socket or args.url, levels, args.requests,
                                    args.prompt_len, args.output_len, args.len_dist, args.rate,
                                    args.seed, args.timeout))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "output_tokens_per_s": r.output_tokens_per_s}
                       for r in results], f, indent=2)
    if args.plot:
        if plot(results, args.plot):
            print(f"plot written to {args.plot}")
        else:
            print("matplotlib is not installed: skipping --plot", file=sys.stderr)
    return 0 if any(r.ok for r in results) else 1
