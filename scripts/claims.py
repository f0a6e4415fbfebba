"""The seed's claims, reproduced by one command: a KV cache, continuous batching, a paged pool,
quantization and concurrency, each measured in-process through the engine and set beside the
first cut's ("seed's") figure where it published one, so a reader can check in a minute what
still holds on this machine.

Usage: scripts/claims.py BUNDLE_DIR... [--out DIR] [--quick]

The first bundle runs the engine claims (a, b, c, e); every bundle is one row of the
quantization claim (d), scored against the first fp32 bundle given. Writes DIR/claims.md,
DIR/claims.json (every figure, for tests and later comparison) and one PNG per claim
(default DIR: .cache/claims). `--quick` shrinks every workload for a tiny bundle.

Wall times are the noisy part: the deterministic counts beside them (tokens computed, engine
steps, token slots, blocks) carry the claims, and the report says how much of the machine other
processes used while it ran."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgert.bundle import Bundle
from edgert.config import EngineConfig, MiB
from edgert.engine.llm_engine import LLMEngine
from edgert.sampling_params import SamplingParams
from edgert.tools.bench_offline import workload
from edgert.tools.evaluate import (
    CachedScorer,
    EvalConfig,
    GraphScorer,
    bundle_size,
    bundle_tokens,
    evaluate_tokens,
    measure_process,
)

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")


@dataclass(frozen=True)
class Sizes:
    """Every workload's size in one place, so `--quick` is one substitution and the report can
    state exactly what ran."""

    turns: int = 8  # (a) a conversation of this many turns
    user_tokens: int = 40  # (a) each turn's new user tokens
    turn_tokens: int = 24  # (a) tokens generated per turn
    requests: int = 32  # (b, c) requests, all arriving at once
    batch: int = 16  # (b) static batch size = the engine's max_num_seqs
    prompt_len: int = 96  # (b, c) mean prompt tokens (uniform +-50%)
    out_min: int = 8  # (b, c) output lengths drawn uniformly from [out_min, out_max]
    out_max: int = 256
    rounds: int = 2  # (b) rounds of each scheme, interleaved
    levels: tuple[int, ...] = (1, 4, 16)  # (e) concurrent clients
    level_requests: tuple[int, ...] = (4, 8, 32)  # (e) requests per level
    level_prompt: int = 128  # (e) mean prompt / output tokens (uniform +-50%), as the seed's
    level_output: int = 64
    ppl_window: int = 512  # (d) the seed's protocol: windows of 512 every 256 tokens
    ppl_stride: int = 256
    ppl_tokens: int = 8192
    probe_tokens: int = 64  # (d) a fresh process generating 16 x 64 tokens, 64 MiB pool
    probe_streams: tuple[int, ...] = (1, 16)
    probe_kv: int = 64 * MiB
    kv_memory: int = 256 * MiB  # the engine's pool (the runtime's default)
    max_model_len: int = 1024  # bounds the shape menu warm-up runs; the workloads stay below


QUICK = Sizes(turns=4, user_tokens=12, turn_tokens=8, requests=12, batch=4, prompt_len=16,
              out_min=4, out_max=48, levels=(1, 2, 4), level_requests=(2, 4, 8),
              level_prompt=16, level_output=8, ppl_window=64, ppl_stride=32, ppl_tokens=256,
              probe_tokens=8, probe_streams=(1, 4), probe_kv=4 * MiB, kv_memory=16 * MiB,
              max_model_len=256)

# The first cut's published figures (git show 8157e3c:README.md, 7965829:README.md): SmolLM2-135M
# on a 2-core AVX2 AMD EPYC, ORT's CPU provider.
SEED_BATCHED = {"batched_tps": 127.3, "sequential_tps": 26.7, "ratio": 4.77}
SEED_SERVE = {  # edgert bench --socket against edgert serve, 32 requests, 128 / 64 tokens
    1: {"ttft_p50": 0.25, "tpot_p50": 0.0325, "out_tps": 27.6},
    4: {"ttft_p50": 0.39, "tpot_p50": 0.0525, "out_tps": 67.4},
    16: {"ttft_p50": 1.10, "tpot_p50": 0.136, "out_tps": 97.8},
    32: {"ttft_p50": 6.46, "tpot_p50": 0.146, "out_tps": 91.5},
}
SEED_QUANT = {  # (precision, symmetric, group size) of a cpu-flavour bundle -> the seed's row
    ("fp32", None, None): {"label": "fp32", "size_mib": 514.8, "rss_mib": 800, "ppl": 11.798,
                           "rise": None, "top1": None, "tps_1": 37.1, "tps_16": 290},
    ("int8", True, None): {"label": "int8 cpu", "size_mib": 139.4, "rss_mib": 389,
                           "ppl": 11.816, "rise": 0.0015, "top1": 0.9750, "tps_1": 72.1,
                           "tps_16": 261},
    ("int4", True, 32): {"label": "int4-g32 sym", "size_mib": 88.4, "rss_mib": 337,
                         "ppl": 12.924, "rise": 0.0954, "top1": 0.8526, "tps_1": 100.4,
                         "tps_16": 327},
    ("int4", True, 128): {"label": "int4-g128 sym", "size_mib": 88.0, "rss_mib": 312,
                          "ppl": 13.420, "rise": 0.1375, "top1": 0.8166, "tps_1": 96.2,
                          "tps_16": 336},
    ("int4", False, 32): {"label": "int4-g32 asym", "size_mib": 94.8, "rss_mib": 367,
                          "ppl": 11.844, "rise": 0.0039, "top1": 0.9687, "tps_1": 86.9,
                          "tps_16": 299},
}


# ---- the machine ---------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """The figures depend on the SIMD the kernels found (VNNI changes int8 speed and, on the
    first cut's graph, even its bits), so the report names them."""
    info = {"cores": os.cpu_count(), "model": "", "flags": {f: False for f in FLAGS}}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not info["model"]:
            info["model"] = value.strip()
        if key.strip() == "flags":
            have = set(value.split())
            info["flags"] = {f: f in have for f in FLAGS}
            break
    return info


class CpuShare:
    """How much of the machine other processes took while we measured: busy time of all cores
    (/proc/stat) minus ours and our children's, over wall time x cores. Other engineers'
    jobs share these cores, and a reader must know whether the timings saw a quiet machine."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> float:
        wall = time.monotonic() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


# ---- driving the engine ----------------------------------------------------------------------

def make_engine(bundle: Bundle, sizes: Sizes, prefix_caching: bool) -> LLMEngine:
    """Warmed up, so no graph shape pays ORT's first-call cost inside a timing."""
    seats = max(sizes.batch, *sizes.levels)
    engine = LLMEngine(bundle, EngineConfig(
        kv_memory=sizes.kv_memory, max_num_seqs=seats, max_model_len=sizes.max_model_len,
        enable_prefix_caching=prefix_caching, verify_bundle=False))
    engine.warmup()
    return engine


def greedy(max_tokens: int) -> SamplingParams:
    """Fixed lengths (ignore_eos) so both sides of a comparison do exactly the same work."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def generate(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request(prompt, greedy(max_tokens))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.token_ids)
    return out


def computed_tokens(engine: LLMEngine) -> int:
    """Tokens whose K/V the graph computed so far: prompt tokens prefilled plus decode rows."""
    return engine.stats.prefill_tokens + engine.stats.decode_seqs


# ---- (a) with and without a KV cache -------------------------------------------------------------

def conversation(engine: LLMEngine, user_turns: list[list[int]], turn_tokens: int,
                 recompute: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """Each turn's prompt is the whole conversation so far. With the cache the engine computes
    only what its prefix cache lacks; `recompute` makes every generated token a call of its own
    on an engine without prefix caching, so each token prefills the whole context again."""
    history: list[int] = []
    turns = []
    for user in user_turns:
        history = history + user
        before, t0 = computed_tokens(engine), time.perf_counter()
        if recompute:
            new: list[int] = []
            for _ in range(turn_tokens):
                new += generate(engine, history + new, 1)
        else:
            new = generate(engine, history, turn_tokens)
        turns.append({"seconds": time.perf_counter() - t0, "context": len(history),
                      "computed": computed_tokens(engine) - before})
        history = history + new
    return turns, history


def claim_kv_cache(bundle: Bundle, sizes: Sizes) -> dict[str, Any]:
    """Returns the engine without prefix caching too: the other engine claims reuse it, so a
    run warms two engines, not three."""
    with_cache = make_engine(bundle, sizes, prefix_caching=True)
    users = workload(with_cache.tokenizer, sizes.turns, sizes.user_tokens, "fixed", seed=1)
    warm = workload(with_cache.tokenizer, 1, sizes.user_tokens, "fixed", seed=2)[0]
    generate(with_cache, warm, 2)
    ours, conv_with = conversation(with_cache, users, sizes.turn_tokens, recompute=False)
    del with_cache
    gc.collect()
    without = make_engine(bundle, sizes, prefix_caching=False)
    generate(without, warm, 2)
    base, conv_without = conversation(without, users, sizes.turn_tokens, recompute=True)
    turns = [{"turn": i + 1, "context": a["context"], "with_s": a["seconds"],
              "without_s": b["seconds"], "with_computed": a["computed"],
              "without_computed": b["computed"]} for i, (a, b) in enumerate(zip(ours, base))]
    return {"turns": turns, "identical": conv_with == conv_without, "engine": without,
            "final_context": len(conv_with)}


# ---- (b, c) static vs continuous batching, and what the pool holds meanwhile -----------------

def pool_sample(engine: LLMEngine, model_len: int) -> dict[str, int]:
    """What the running requests hold against what each memory scheme would have set aside for
    them at this moment."""
    running = engine.scheduler.running
    return {"running": len(running),
            "held": sum(s.num_computed for s in running),
            "paged": engine.allocator.usage().used * engine.block_size,
            "reserve_request": sum(len(s.prompt_ids) + s.params.max_tokens for s in running),
            "reserve_model": len(running) * model_len}


def run_waves(engine: LLMEngine, prompts: list[list[int]], lengths: list[int], wave: int
              ) -> dict[str, Any]:
    """Every request arrives at t0; a wave is admitted only when the previous one has
    finished, so wave = batch is static batching and wave = all is continuous batching."""
    model_len = engine.model_config.max_position_embeddings
    t0 = time.monotonic()
    stats0, metrics, trace = replace(engine.stats), [], []
    for lo in range(0, len(prompts), wave):
        for p, n in zip(prompts[lo:lo + wave], lengths[lo:lo + wave]):
            engine.add_request(p, greedy(n), arrival=t0)
        while engine.has_unfinished():
            outs = engine.step()
            sample = pool_sample(engine, model_len)
            sample["t"] = time.monotonic() - t0
            trace.append(sample)
            metrics += [o.metrics for o in outs if o.metrics is not None]
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "steps": engine.stats.steps - stats0.steps,
            "decode_calls": engine.stats.decode_calls - stats0.decode_calls,
            "prefill_calls": engine.stats.prefill_calls - stats0.prefill_calls,
            "trace": trace, **request_stats(metrics, seconds)}


def request_stats(metrics: list[Any], seconds: float) -> dict[str, Any]:
    ttft = np.array([m.ttft for m in metrics])
    e2e = np.array([m.finished_time - m.arrival_time for m in metrics])
    out = sum(m.completion_tokens for m in metrics)
    return {"output_tokens": out, "out_tps": out / seconds, "ttft": ttft.tolist(),
            "e2e": e2e.tolist(),
            "ttft_mean": float(ttft.mean()), "ttft_p50": float(np.median(ttft)),
            "e2e_mean": float(e2e.mean()), "e2e_p50": float(np.median(e2e))}


def slot_use(run: dict[str, Any], seats: int) -> float:
    """Tokens generated per engine step over the seats a step offers: wall-time-free, so it
    shows on a tiny model what throughput shows on a real one."""
    return run["output_tokens"] / (run["steps"] * seats)


def claim_batching(engine: LLMEngine, sizes: Sizes) -> dict[str, Any]:
    """Rounds in the order static, continuous, continuous, static, ..., each scheme keeping
    its fastest round: another job's burst then hurts both alike instead of deciding the
    ratio. The counts are the same in every round (the scheduler does not look at clocks)."""
    prompts = workload(engine.tokenizer, sizes.requests, sizes.prompt_len, "uniform", seed=3)
    rng = random.Random(4)
    lengths = [rng.randint(sizes.out_min, sizes.out_max) for _ in prompts]
    waves = {"static": sizes.batch, "continuous": len(prompts)}
    order = [k for i in range(sizes.rounds) for k in
             (("static", "continuous") if i % 2 == 0 else ("continuous", "static"))]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in waves}
    for label in order:
        runs[label].append(run_waves(engine, prompts, lengths, waves[label]))
    result: dict[str, Any] = {"lengths": lengths, "seats": engine.config.max_num_seqs,
                              "rounds": sizes.rounds}
    for label, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["seconds"]))
        best["slot_use"] = slot_use(best, engine.config.max_num_seqs)
        best["all_seconds"] = [r["seconds"] for r in rs]
        best["same_counts"] = len({(r["steps"], r["decode_calls"]) for r in rs}) == 1
        result[label] = best
    return result


def claim_memory(engine: LLMEngine, trace: list[dict[str, int]]) -> dict[str, Any]:
    """Utilisation as time averages (sums over steps), and how many requests of this load the
    engine's pool bytes would hold under each scheme."""
    live = [s for s in trace if s["running"]]
    total = {k: sum(s[k] for s in live) for k in ("held", "paged", "reserve_request",
                                                  "reserve_model", "running")}
    pool_tokens = engine.allocator.usage().total * engine.block_size
    per_request = {k: total[k] / total["running"] for k in
                   ("paged", "reserve_request", "reserve_model")}
    model_len = engine.model_config.max_position_embeddings
    return {
        "util": {k: total["held"] / total[k] for k in ("paged", "reserve_request",
                                                        "reserve_model")},
        "fit": {k: pool_tokens / v for k, v in per_request.items()},
        "pool_tokens": pool_tokens, "pool_mib": pool_tokens * engine.block_bytes
        / engine.block_size / MiB, "block_size": engine.block_size, "model_len": model_len,
        "peak_running": max(s["running"] for s in live),
        "peak_mib": {k: max(s[k] for s in live) * engine.block_bytes / engine.block_size / MiB
                     for k in ("held", "paged", "reserve_request", "reserve_model")},
    }


# ---- (e) TTFT, TPOT and throughput against concurrency ----------------------------------------

def closed_loop(engine: LLMEngine, work: list[tuple[list[int], int]], clients: int
                ) -> dict[str, Any]:
    """`clients` callers that each send their next request when the last one finished, as the
    seed's `edgert bench --socket` did, minus the socket."""
    queue, metrics = list(work), []
    t0 = time.monotonic()
    while queue or engine.has_unfinished():
        while queue and engine.num_requests < clients:
            prompt, n = queue.pop(0)
            engine.add_request(prompt, greedy(n))
        metrics += [o.metrics for o in engine.step() if o.metrics is not None]
    seconds = time.monotonic() - t0
    tpot = [m.tpot for m in metrics if m.tpot is not None]
    return {"clients": clients, "requests": len(work), "seconds": seconds,
            "tpot_p50": float(np.median(tpot)) if tpot else None,
            **request_stats(metrics, seconds)}


def claim_concurrency(engine: LLMEngine, sizes: Sizes) -> list[dict[str, Any]]:
    levels = []
    for i, (clients, n) in enumerate(zip(sizes.levels, sizes.level_requests)):
        prompts = workload(engine.tokenizer, n, sizes.level_prompt, "uniform", seed=10 + i)
        rng = random.Random(20 + i)
        outs = [rng.randint(sizes.level_output // 2, sizes.level_output * 3 // 2)
                for _ in prompts]
        levels.append(closed_loop(engine, list(zip(prompts, outs)), clients))
    return levels


# ---- (d) quantization ----------------------------------------------------------------------------

def is_seed_model(bundle: Bundle) -> bool:
    c = bundle.config
    return (c.num_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)


def seed_row(bundle: Bundle) -> dict[str, Any] | None:
    """The seed measured cpu-flavour SmolLM2 bundles only; anything else has no figure."""
    q = bundle.manifest.get("quantization") or {}
    if not is_seed_model(bundle) or (q and q.get("flavour") != "cpu"):
        return None
    key = ((bundle.precision, None, None) if bundle.precision in ("fp32", "fp16")
           else (bundle.precision, q.get("symmetric"),
                 q.get("group_size") if bundle.precision == "int4" else None))
    return SEED_QUANT.get(key)


def quant_label(bundle: Bundle) -> str:
    q = bundle.manifest.get("quantization") or {}
    if bundle.precision != "int4":
        return bundle.precision + (f" {q['flavour']}" if q.get("flavour") else "")
    sym = "sym" if q.get("symmetric") else "asym"
    return f"int4-g{q.get('group_size')} {sym} {q.get('flavour', '')}".strip()


def claim_quantization(bundles: list[Bundle], sizes: Sizes) -> list[dict[str, Any]]:
    """Perplexity with evaluate.py's scorer, every candidate against the first fp32 bundle's
    cached log-probs (scored once), then size and a fresh process's peak RSS and decode speed
    (evaluate.py's probe, the seed's protocol)."""
    cfg = EvalConfig(window=sizes.ppl_window, stride=sizes.ppl_stride, tokens=sizes.ppl_tokens)
    ref_bundle = next((b for b in bundles if b.precision == "fp32"), None)
    ref = CachedScorer(GraphScorer.from_bundle(ref_bundle)) if ref_bundle else None
    ref_tokens = bundle_tokens(ref_bundle) if ref_bundle else None
    order = sorted(bundles, key=lambda b: b is not ref_bundle)  # the reference fills its cache
    rows = {}
    for b in order:
        tokens = bundle_tokens(b)
        comparable = ref is not None and np.array_equal(tokens, ref_tokens)
        scorer = ref if b is ref_bundle else GraphScorer.from_bundle(b)
        res = evaluate_tokens(scorer, tokens, cfg, ref if comparable and b is not ref_bundle
                              else None)
        mem = measure_process(b, tokens=sizes.probe_tokens, streams=sizes.probe_streams,
                              kv_memory=sizes.probe_kv)
        rows[id(b)] = {
            "bundle": b.name, "label": quant_label(b), "path": str(b.path),
            "size_mib": bundle_size(b) / MiB, "rss_mib": mem["peak_rss_kib"] / 1024,
            "ppl": res.perplexity, "rise": res.perplexity_rise, "top1": res.top1_agreement,
            "kl": res.mean_kl, "scored": res.scored_tokens,
            "tps": {n: mem.get(f"decode_tokens_per_s_{n}") for n in sizes.probe_streams},
            "seed": seed_row(b)}
        del scorer
        gc.collect()
    return [rows[id(b)] for b in bundles]


# ---- plots ---------------------------------------------------------------------------------------

def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kv_cache(a: dict[str, Any], path: Path) -> None:
    plt = plt_module()
    turns = [t["turn"] for t in a["turns"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.plot(turns, [t["with_s"] for t in a["turns"]], "o-", label="with KV cache (engine)")
    ax.plot(turns, [t["without_s"] for t in a["turns"]], "s-",
            label="without: full prefill per token")
    ax.set(xlabel="turn", ylabel="seconds per turn", title="(a) cost per turn")
    bx.plot(turns, [t["with_computed"] for t in a["turns"]], "o-", label="with")
    bx.plot(turns, [t["without_computed"] for t in a["turns"]], "s-", label="without")
    bx.set(xlabel="turn", ylabel="tokens computed per turn", title="(a) work per turn")
    for x in (ax, bx):
        x.legend()
        x.grid(alpha=0.3)
    _save(fig, path)


def plot_batching(b: dict[str, Any], path: Path) -> None:
    plt = plt_module()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label in ("static", "continuous"):
        run = b[label]
        ax.plot([s["t"] for s in run["trace"]], [s["running"] for s in run["trace"]],
                label=f"{label}: {run['out_tps']:.1f} out tok/s")
        done = np.sort(run["e2e"])
        bx.step(done, np.arange(1, len(done) + 1), where="post", label=label)
    ax.set(xlabel="seconds", ylabel="running requests", title="(b) batch occupancy")
    bx.set(xlabel="seconds since arrival", ylabel="requests completed",
           title="(b) completions")
    for x in (ax, bx):
        x.legend()
        x.grid(alpha=0.3)
    _save(fig, path)


def plot_memory(b: dict[str, Any], c: dict[str, Any], path: Path) -> None:
    plt = plt_module()
    trace = [s for s in b["continuous"]["trace"] if s["running"]]
    steps = np.arange(len(trace))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for key, label in (("held", "tokens held"),
                       ("paged", f"paged pool: used blocks x {c['block_size']}"),
                       ("reserve_request", "reserve prompt + max_tokens per request"),
                       ("reserve_model", f"reserve max_model_len ({c['model_len']}) per "
                                         "request")):
        ax.plot(steps, [s[key] for s in trace], label=label)
    ax.axhline(c["pool_tokens"], color="k", ls=":", label="the pool's capacity")
    ax.set(yscale="log", xlabel="engine step (continuous run of (b))", ylabel="tokens",
           title="(c) KV memory held vs set aside")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_quantization(rows: list[dict[str, Any]], streams: tuple[int, ...], path: Path) -> None:
    plt = plt_module()
    panels = [("size_mib", "size on disk (MiB)"), ("rss_mib", "peak RSS (MiB)"),
              ("ppl", "perplexity"), (f"tps_{streams[0]}", f"decode tok/s, {streams[0]} stream"),
              (f"tps_{streams[-1]}", f"decode tok/s, {streams[-1]} streams")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    x = np.arange(len(rows))
    for ax, (key, title) in zip(axes, panels):
        ours = [_quant_value(r, key) for r in rows]
        seed = [(r["seed"] or {}).get(key) for r in rows]
        ax.bar(x - 0.2, [v or 0 for v in ours], 0.4, label="ours")
        ax.bar(x + 0.2, [v or 0 for v in seed], 0.4, label="seed", hatch="//", alpha=0.6)
        ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def _quant_value(row: dict[str, Any], key: str) -> float | None:
    if key.startswith("tps_"):
        return row["tps"].get(int(key[4:]))
    return row[key]


def plot_concurrency(levels: list[dict[str, Any]], seed_model: bool, path: Path) -> None:
    """The seed's served figures are drawn only beside the seed's model: on another they
    would only flatten the axes."""
    plt = plt_module()
    xs = [lv["clients"] for lv in levels]
    seed_x = [c for c in SEED_SERVE if c <= max(xs)] if seed_model else []
    seed = [SEED_SERVE[c] for c in seed_x]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title, scale) in zip(axes, (("ttft_p50", "TTFT p50 (s)", 1),
                                              ("tpot_p50", "TPOT p50 (ms)", 1000),
                                              ("out_tps", "output tok/s", 1))):
        ax.plot(xs, [(lv[key] or 0) * scale for lv in levels], "o-", label="ours (offline)")
        if seed:
            ax.plot(seed_x, [s[key] * scale for s in seed], "s--", label="seed (served)")
        ax.set(xscale="log", xlabel="concurrent clients", title=f"(e) {title}")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---- the report ----------------------------------------------------------------------------------

def _f(v: float | None, fmt: str = ".2f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v * 100:+.2f}%"


def section_kv(a: dict[str, Any], sizes: Sizes) -> list[str]:
    t = a["turns"]
    first, last = t[0], t[-1]
    growth_with = last["with_s"] / first["with_s"]
    growth_without = last["without_s"] / first["without_s"]
    lines = [
        "## (a) With vs without a KV cache", "",
        f"A conversation of {sizes.turns} turns, {sizes.user_tokens} new user tokens and "
        f"{sizes.turn_tokens} generated tokens each (greedy), every turn's prompt the whole "
        f"conversation so far (final context {a['final_context']} tokens). With: the engine, "
        "prefix cache on. Without: prefix cache off and one `max_tokens=1` call per token, so "
        "each token prefills the whole context again. Seed: no figure (the first cut never "
        "measured it).", "",
        "![(a)](a_kv_cache.png)", "",
        "| turn | context | with: s | without: s | with: tokens computed | without: tokens "
        "computed |",
        "|---|---|---|---|---|---|",
        *[f"| {r['turn']} | {r['context']} | {r['with_s']:.3f} | {r['without_s']:.3f} | "
          f"{r['with_computed']} | {r['without_computed']} |" for r in t], "",
        f"Turn {last['turn']} costs {last['without_s'] / last['with_s']:.1f}x as much without "
        f"the cache ({last['without_computed'] / last['with_computed']:.1f}x the tokens "
        f"computed); from turn 1 to {last['turn']} a turn's cost grew {growth_with:.1f}x with "
        f"it and {growth_without:.1f}x without. Both conversations are token-for-token "
        f"{'identical' if a['identical'] else 'DIFFERENT (a bug: the graph is meant to be batch-invariant)'}"  # noqa: E501
        ".", ""]
    return lines


def _secs(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" if v >= 1 else f"{v:.3f}" for v in values)


def section_batching(b: dict[str, Any], sizes: Sizes) -> list[str]:
    s, c = b["static"], b["continuous"]
    lines = [
        "## (b) Static vs continuous batching, mixed output lengths", "",
        f"{sizes.requests} requests arriving at once, prompts {sizes.prompt_len} tokens "
        f"(uniform +-50%), output lengths uniform in [{sizes.out_min}, {sizes.out_max}] "
        f"(ignore_eos). Static: batches of {sizes.batch} that start together; the next waits "
        f"for the longest of the batch. Continuous: all submitted, the scheduler refills a "
        f"seat as a sequence finishes ({b['seats']} seats). Times from arrival; each scheme's "
        f"fastest of {b['rounds']} interleaved rounds (every round's seconds: static "
        f"{_secs(s['all_seconds'])}, continuous {_secs(c['all_seconds'])}).", "",
        "![(b)](b_batching.png)", "",
        "| | output tok/s | TTFT mean | TTFT p50 | completion mean | completion p50 | "
        "engine steps | token slots used |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {k} | {r['out_tps']:.1f} | {r['ttft_mean']:.2f} s | {r['ttft_p50']:.2f} s | "
          f"{r['e2e_mean']:.2f} s | {r['e2e_p50']:.2f} s | {r['steps']} | "
          f"{r['slot_use'] * 100:.0f}% |" for k, r in (("static", s), ("continuous", c))],
        f"| **continuous / static** | **{c['out_tps'] / s['out_tps']:.2f}x** | | | "
        f"{c['e2e_mean'] / s['e2e_mean']:.2f}x | | {c['steps'] / s['steps']:.2f}x | |", "",
        f"Seed: it measured another comparison, batched (16) vs one sequence at a time, "
        f"{SEED_BATCHED['ratio']}x output tok/s ({SEED_BATCHED['batched_tps']} vs "
        f"{SEED_BATCHED['sequential_tps']}, fixed 64-token outputs, AVX2); it never measured "
        "static vs continuous.", "",
        f"Refilling seats as sequences finish did the same work in "
        f"{c['steps'] / s['steps'] * 100:.0f}% of the engine steps ({c['slot_use'] * 100:.0f}% "
        f"of the token slots used, against {s['slot_use'] * 100:.0f}%); in time, "
        f"{c['out_tps'] / s['out_tps']:.2f}x the output tokens/s and "
        f"{c['e2e_mean'] / s['e2e_mean']:.2f}x the mean wait for completion. "
        + step_cost(c["seconds"] / c["steps"], s["seconds"] / s["steps"]), ""]
    return lines


def step_cost(cont: float, static: float) -> str:
    """Whether the steps saved became time saved: on a CPU a fuller step can cost more."""
    said = (f"A step took {cont * 1e3:.1f} ms continuous vs {static * 1e3:.1f} ms static")
    if cont > 1.05 * static:
        return (said + ": on a CPU a step's cost grows with its rows, so fuller steps save "
                "less time than they save steps.")
    return said + ", so the steps saved became time saved."


def _size(mib: float) -> str:
    return f"{mib:.1f} MiB" if mib >= 1 else f"{mib * 1024:.0f} KiB"


def section_memory(c: dict[str, Any], sizes: Sizes) -> list[str]:
    u, fit, peak = c["util"], c["fit"], c["peak_mib"]
    rows = ((f"paged pool (blocks of {c['block_size']})", "paged"),
            ("reserve prompt + max_tokens", "reserve_request"),
            (f"reserve max_model_len ({c['model_len']})", "reserve_model"))
    whole = int(fit["reserve_model"])
    versus_max = (f"{fit['paged'] / whole:.0f}x those of a max-length one" if whole else
                  f"a max-length reservation ({c['model_len']} tokens) does not fit even one "
                  "request in this pool")
    return [
        "## (c) Paged pool vs per-request reservation", "",
        "At every step of (b)'s continuous run: tokens the running requests hold against "
        "what the pool's used blocks cover (allocator `usage()`), and what reserving "
        "prompt + max_tokens or the model's context per running request would take. Pool: "
        f"{_size(c['pool_mib'])} = {c['pool_tokens']} tokens; peak {c['peak_running']} "
        "running. Seed: no figure.", "",
        "![(c)](c_memory.png)", "",
        "| scheme | mean utilisation (held / set aside) | requests of this load the pool fits | "
        "peak bytes at this load |",
        "|---|---|---|---|",
        *[f"| {label} | {u[k] * 100:.1f}% | {int(fit[k])} | {_size(peak[k])} |"
          for label, k in rows], "",
        f"Paging keeps {u['paged'] * 100:.0f}% of what it sets aside in use (the rest is "
        "each request's last, partly filled block), so the same bytes hold "
        f"{fit['paged'] / fit['reserve_request']:.1f}x the requests of an exact prompt + "
        f"max_tokens reservation, and {versus_max}.", ""]


def _ppl(ppl: float, rise: float | None) -> str:
    return f"{ppl:.3f}" + (f" ({_pct(rise)})" if rise is not None else "")


def section_quant(rows: list[dict[str, Any]], sizes: Sizes) -> list[str]:
    n1, nn = sizes.probe_streams[0], sizes.probe_streams[-1]

    def seed_cells(s: dict[str, Any] | None) -> str:
        if not s:
            return "| | | | | |"
        return (f"| {s['size_mib']:.1f} | {s['rss_mib']:.0f} | {_ppl(s['ppl'], s['rise'])} | "
                f"{s['tps_1']:.1f} | {s['tps_16']:.0f} |")

    body = [f"| {r['label']} | {r['size_mib']:.1f} | {r['rss_mib']:.0f} | "
            f"{_ppl(r['ppl'], r['rise'])} | {_f(r['top1'] and r['top1'] * 100, '.2f', '%')} | "
            f"{_f(r['tps'][n1], '.1f')} | {_f(r['tps'][nn], '.0f')} " + seed_cells(r["seed"])
            for r in rows]
    ref = next((r for r in rows if r["label"].startswith("fp32")), rows[0])
    best = min(rows, key=lambda r: r["size_mib"])
    verdict = ("One bundle given: nothing to compare it with." if best is ref else
               f"The smallest bundle ({best['label']}) is {best['size_mib'] / ref['size_mib']:.2f}x"
               f" the {ref['label']} one on disk and {best['rss_mib'] / ref['rss_mib']:.2f}x its "
               f"peak memory, at {_pct(best['rise']) or 'an unmeasured'} perplexity.")
    return [
        "## (d) Quantization", "",
        f"Each bundle given: size on disk (every file of the manifest), peak RSS of a fresh "
        f"process generating {nn} x {sizes.probe_tokens} tokens with a "
        f"{sizes.probe_kv // MiB} MiB pool, perplexity over {rows[0]['scored']} held-out tokens "
        f"(window {sizes.ppl_window}, stride {sizes.ppl_stride}; top-1 against the fp32 "
        f"bundle), decode tok/s at {n1} and {nn} streams (`edgert eval`'s functions). Seed: "
        "its README's table (8,447 tokens, same protocol, AVX2, another job on the cores); it "
        "had no fp16 bundle.", "",
        "![(d)](d_quantization.png)", "",
        f"| bundle | MiB | peak RSS MiB | ppl (vs fp32) | top-1 | tok/s {n1} | tok/s {nn} | "
        f"seed: MiB | seed: RSS | seed: ppl | seed: tok/s 1 | seed: tok/s 16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *body, "", verdict, ""]


def section_concurrency(levels: list[dict[str, Any]]) -> list[str]:
    def seed(c: int, k: str, scale: float = 1) -> str:
        s = SEED_SERVE.get(c)
        return "" if s is None else f"{s[k] * scale:.3g}"

    body = [f"| {lv['clients']} | {lv['requests']} | {lv['ttft_p50']:.2f} s | "
            f"{_f(lv['tpot_p50'] and lv['tpot_p50'] * 1000, '.1f')} ms | {lv['e2e_p50']:.2f} s "
            f"| {lv['out_tps']:.1f} | {seed(lv['clients'], 'ttft_p50')} | "
            f"{seed(lv['clients'], 'tpot_p50', 1000)} | {seed(lv['clients'], 'out_tps')} |"
            for lv in levels]
    first, last = levels[0], levels[-1]
    return [
        "## (e) TTFT, TPOT and throughput against concurrency", "",
        "Closed loop through the engine, offline (no socket, no HTTP, no detokenised "
        "streaming to a client): each client sends its next request when its last one "
        "finished; prompts and outputs uniform +-50% around the means. Seed: `edgert bench "
        "--socket` against `edgert serve` (32 requests, 128 / 64 tokens, AVX2): through the "
        "server, so its TTFT includes HTTP and queueing in the server.", "",
        "![(e)](e_concurrency.png)", "",
        "| clients | requests | TTFT p50 | TPOT p50 | E2E p50 | out tok/s | seed: TTFT p50 s "
        "| seed: TPOT p50 ms | seed: out tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *body, "",
        f"From {first['clients']} to {last['clients']} clients throughput rose "
        f"{last['out_tps'] / first['out_tps']:.1f}x while each token took "
        f"{(last['tpot_p50'] or 0) / (first['tpot_p50'] or 1):.1f}x as long: batching trades "
        "latency per stream for tokens per second.", ""]


def summary(res: dict[str, Any]) -> list[str]:
    a, b, c, q, e = (res[k] for k in ("kv_cache", "batching", "memory", "quantization",
                                      "concurrency"))
    last = a["turns"][-1]
    s, cont = b["static"], b["continuous"]
    small = min(q, key=lambda r: r["size_mib"])
    top = e[-1]
    seed_top = SEED_SERVE.get(top["clients"])
    return [
        "| claim | ours | seed | what it means |", "|---|---|---|---|",
        f"| (a) KV cache | last turn {last['without_s'] / last['with_s']:.1f}x cheaper with "
        f"it ({last['with_s']:.2f} vs {last['without_s']:.2f} s) | no figure | without a "
        "cache every token pays for the whole conversation again |",
        f"| (b) continuous vs static | {cont['out_tps'] / s['out_tps']:.2f}x out tok/s "
        f"({cont['out_tps']:.1f} vs {s['out_tps']:.1f}); {cont['steps']} vs {s['steps']} "
        f"steps | batched vs sequential {SEED_BATCHED['ratio']}x (another comparison) | "
        "seats freed by short requests are refilled instead of idling |",
        f"| (c) paged vs reserved | {c['util']['paged'] * 100:.0f}% vs "
        f"{c['util']['reserve_request'] * 100:.0f}% (prompt + max_tokens) / "
        f"{c['util']['reserve_model'] * 100:.1f}% (max_model_len) utilisation | no figure | "
        f"the same bytes hold {c['fit']['paged'] / c['fit']['reserve_request']:.1f}x the "
        "requests |",
        f"| (d) quantization | {small['label']}: {small['size_mib']:.1f} MiB, "
        f"{small['rss_mib']:.0f} MiB RSS, ppl {small['ppl']:.3f} {_pct(small['rise'])} | "
        + (f"{small['seed']['size_mib']} MiB, {small['seed']['rss_mib']} MiB, ppl "
           f"{small['seed']['ppl']}" if small["seed"] else "no figure for this bundle")
        + " | smaller and lighter at a measured perplexity cost |",
        f"| (e) concurrency | {top['clients']} clients: {top['out_tps']:.1f} out tok/s, TTFT "
        f"p50 {top['ttft_p50']:.2f} s, TPOT p50 {_f(top['tpot_p50'] and top['tpot_p50'] * 1e3, '.0f')}"  # noqa: E501
        f" ms | " + (f"{seed_top['out_tps']} tok/s, {seed_top['ttft_p50']} s, "
                     f"{seed_top['tpot_p50'] * 1e3:.0f} ms (served)" if seed_top else "n/a")
        + " | offline through the engine, not over the socket |", ""]


def report(res: dict[str, Any], sizes: Sizes) -> str:
    m = res["machine"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m["flags"].items())
    shared = res["others_cpu"]
    head = [
        "# The seed's claims, reproduced", "",
        f"`{res['command']}` ({'quick' if res['quick'] else 'full'} workloads), "
        f"{res['date']}, {res['seconds']:.0f} s.", "",
        f"Machine: {m['model'] or 'unknown CPU'}, {m['cores']} cores; CPU flags: {flags}. "
        f"Other processes used {shared * 100:.0f}% of the cores meanwhile: "
        f"{'a shared machine, so wall times are noisy' if shared > 0.1 else 'a quiet machine'}"
        ". Engine claims on " + res["bundle"] + ("" if res["seed_model"] else
                                                 " (not the seed's model: its figures are "
                                                 "for SmolLM2-135M and only set the scale)")
        + ". The seed's figures come from the first cut's README (2-core AVX2 AMD EPYC).", ""]
    return "\n".join(head + summary(res) + section_kv(res["kv_cache"], sizes)
                     + section_batching(res["batching"], sizes)
                     + section_memory(res["memory"], sizes)
                     + section_quant(res["quantization"], sizes)
                     + section_concurrency(res["concurrency"]))


# ---- main ----------------------------------------------------------------------------------------

def run(paths: list[str], out: Path, sizes: Sizes, quick: bool) -> dict[str, Any]:
    share, t0 = CpuShare(), time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    bundles = [Bundle.load(p) for p in paths]
    res: dict[str, Any] = {"machine": machine(), "quick": quick, "bundle": bundles[0].name,
                           "seed_model": is_seed_model(bundles[0]), "sizes": asdict(sizes),
                           "date": time.strftime("%Y-%m-%d %H:%M"),
                           "command": " ".join(["scripts/claims.py", *sys.argv[1:]])}
    progress = _progress(t0)
    a = claim_kv_cache(bundles[0], sizes)
    engine = a.pop("engine")
    res["kv_cache"] = a
    progress("(a) kv cache")
    res["batching"] = claim_batching(engine, sizes)
    res["memory"] = claim_memory(engine, res["batching"]["continuous"]["trace"])
    progress("(b, c) batching, memory")
    res["concurrency"] = claim_concurrency(engine, sizes)
    progress("(e) concurrency")
    del engine
    gc.collect()
    res["quantization"] = claim_quantization(bundles, sizes)
    progress("(d) quantization")
    res["seconds"], res["others_cpu"] = time.monotonic() - t0, share.others()
    plot_kv_cache(res["kv_cache"], out / "a_kv_cache.png")
    plot_batching(res["batching"], out / "b_batching.png")
    plot_memory(res["batching"], res["memory"], out / "c_memory.png")
    plot_quantization(res["quantization"], sizes.probe_streams, out / "d_quantization.png")
    plot_concurrency(res["concurrency"], res["seed_model"], out / "e_concurrency.png")
    (out / "claims.md").write_text(report(res, sizes))
    (out / "claims.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _progress(t0: float):
    def say(what: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {what} done", file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", metavar="BUNDLE_DIR",
                    help="bundles; the first runs the engine claims, each is a row of (d)")
    ap.add_argument("--out", default=".cache/claims", help="report directory (.cache/claims)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny workloads, for a tiny bundle: well under a minute")
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help="held-out tokens scored per bundle (default 8192, the seed's; quick 256)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.ppl_tokens:
        sizes = replace(sizes, ppl_tokens=args.ppl_tokens)
    out = Path(args.out)
    run(args.bundles, out, sizes, args.quick)
    print(f"report: {out / 'claims.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
