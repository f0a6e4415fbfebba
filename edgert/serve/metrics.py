"""Prometheus metrics for the server.

Per-request figures (tokens, TTFT, TPOT, latency, finish reasons) are counted from the engine's
own outputs through `AsyncEngine.on_step`, on the engine thread, so a request that the client
abandons is counted exactly like one that completes. Pool, queue and engine counters are read at
scrape time by a collector: a scrape then costs nothing between scrapes and never goes stale.
A registry per server (not the process-global one) keeps in-process tests independent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgert.outputs import RequestOutput
from edgert.serve.board_sensors import BoardSensors

if TYPE_CHECKING:
    from edgert.engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                    160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine: Callable[[], AsyncEngine | None],
                 model: Callable[[], str | None] = lambda: None, sysfs: Path = Path("/sys")):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "edgert_http_requests", "HTTP requests answered, by route and status",
            ["route", "method", "status"], registry=r)
        self.malformed = Counter(
            "edgert_http_malformed", "Requests aiohttp's HTTP parser rejected with 400",
            registry=r)
        self.requests = Counter(
            "edgert_requests", "Generation requests finished in the engine, by finish reason "
            "(one per prompt; n choices count once)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(
            "edgert_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "edgert_prompt_tokens_cached", "Prompt tokens served from the prefix cache",
            registry=r)
        self.generation_tokens = Counter(
            "edgert_generation_tokens", "Tokens generated for finished requests", registry=r)
        self.ttft = Histogram(
            "edgert_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "edgert_time_per_output_token_seconds", "Mean time per output token after the "
            "first, per request", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "edgert_e2e_request_latency_seconds", "Arrival to last token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(
            "edgert_request_queue_time_seconds", "Arrival until the engine first ran the "
            "request", buckets=_LATENCY_BUCKETS, registry=r)
        # The same figures under the names and semantics serving gateways already read from
        # vLLM (labelled by model_name as vLLM does), so a gateway in front of several boards
        # routes on them unchanged.
        self.vllm = {name: Histogram(f"vllm:{name}", doc, ["model_name"], buckets=buckets,
                                     registry=r)
                     for name, doc, buckets in (
                         ("time_to_first_token_seconds", "Arrival to first generated token",
                          _LATENCY_BUCKETS),
                         ("inter_token_latency_seconds", "Time between tokens as a client "
                          "receives them (0 for tokens that arrive together)", _TPOT_BUCKETS),
                         ("e2e_request_latency_seconds", "Arrival to last token",
                          _LATENCY_BUCKETS),
                         ("request_queue_time_seconds", "Arrival until the engine first "
                          "ran the request", _LATENCY_BUCKETS))}
        self._last_token: dict[tuple[str, int], float] = {}  # per choice: when it last emitted
        self._model = model
        r.register(_EngineCollector(engine, model))
        r.register(BoardSensors(sysfs))

    def on_step(self, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread after each step that produced outputs."""
        now = time.monotonic()
        vllm = {k: h.labels(self._model() or "") for k, h in self.vllm.items()}
        for out in outputs:
            key = (out.request_id, out.index)
            if out.token_ids:
                last = self._last_token.get(key)
                if last is not None:
                    vllm["inter_token_latency_seconds"].observe(now - last)
                for _ in out.token_ids[1:]:
                    vllm["inter_token_latency_seconds"].observe(0.0)
                self._last_token[key] = now
            if out.finished:
                self._last_token.pop(key, None)
            m = out.metrics
            if m is None:
                continue
            if m.queue_time is not None:
                self.queue.observe(m.queue_time)
                vllm["request_queue_time_seconds"].observe(m.queue_time)
            self.requests.labels(out.finish_reason or "unknown").inc()
            self.prompt_tokens.inc(m.prompt_tokens)
            self.cached_prompt_tokens.inc(m.cached_prompt_tokens)
            self.generation_tokens.inc(m.completion_tokens)
            if m.ttft is not None:
                self.ttft.observe(m.ttft)
                vllm["time_to_first_token_seconds"].observe(m.ttft)
            if m.tpot is not None:
                self.tpot.observe(m.tpot)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
                vllm["e2e_request_latency_seconds"].observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Engine state read at scrape time. Reads plain counters owned by the engine thread; a
    scrape racing a step may see a count that is one step old, never a torn structure."""

    def __init__(self, engine: Callable[[], AsyncEngine | None],
                 model: Callable[[], str | None]):
        self._engine = engine
        self._model = model

    def collect(self) -> Iterable[Metric]:
        aengine = self._engine()
        alive = GaugeMetricFamily("edgert_engine_alive", "1 when the engine loop is running")
        alive.add_metric([], 1.0 if aengine is not None and aengine.alive else 0.0)
        yield alive
        if aengine is None:
            return
        engine = aengine.engine
        age = GaugeMetricFamily("edgert_engine_heartbeat_age_seconds",
                                "Seconds since the engine loop last turned")
        age.add_metric([], max(0.0, time.monotonic() - aengine.heartbeat))
        yield age
        usage = engine.pool_usage()
        blocks = GaugeMetricFamily("edgert_kv_blocks", "KV pool blocks by state "
                                   "(used: owned by a sequence; cached: reusable prefix, "
                                   "evictable; free)", labels=["state"])
        for state in ("used", "cached", "free"):
            blocks.add_metric([state], float(getattr(usage, state)))
        yield blocks
        total = GaugeMetricFamily("edgert_kv_blocks_total", "Usable KV pool blocks")
        total.add_metric([], float(usage.total))
        yield total
        sched = engine.scheduler
        running = GaugeMetricFamily("edgert_num_requests_running",
                                    "Sequences in the running batch")
        running.add_metric([], float(len(sched.running)))
        yield running
        waiting = GaugeMetricFamily("edgert_num_requests_waiting", "Sequences queued")
        waiting.add_metric([], float(sched.num_waiting))
        yield waiting
        label = [self._model() or ""]
        for name, doc, value in (
                ("vllm:num_requests_running", "Sequences in the running batch",
                 len(sched.running)),
                ("vllm:num_requests_waiting", "Sequences queued", sched.num_waiting),
                ("vllm:kv_cache_usage_perc", "Fraction of KV blocks owned by sequences "
                 "(1 = full; reusable cached prefixes count as free, as in vLLM)",
                 usage.used / max(usage.total, 1))):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, float(value))
            yield g
        stats, astats = engine.stats, engine.allocator.stats
        for name, doc, value in (
                ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                 astats.prefix_queries_tokens),
                ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                 astats.prefix_hit_tokens)):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, float(value))
            yield c
        for name, doc, value in (
            ("edgert_engine_steps", "Engine steps", stats.steps),
            ("edgert_decode_calls", "Decode graph calls", stats.decode_calls),
            ("edgert_decode_sequences", "Summed decode batch sizes", stats.decode_seqs),
            ("edgert_prefill_calls", "Prefill graph calls", stats.prefill_calls),
            ("edgert_prefill_tokens", "Prompt tokens computed (not served from the cache)",
             stats.prefill_tokens),
            ("edgert_preemptions", "Sequences preempted for lack of blocks", stats.preemptions),
            ("edgert_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             astats.prefix_queries_tokens),
            ("edgert_prefix_cache_hits", "Prompt tokens found in the prefix cache",
             astats.prefix_hit_tokens),
            ("edgert_spec_decode_draft_tokens", "Speculative (prompt-lookup) tokens checked",
             stats.draft_tokens),
            ("edgert_spec_decode_accepted_tokens",
             "Speculative tokens the model confirmed (acceptance rate: accepted / draft)",
             stats.accepted_tokens),
            ("edgert_constrained_forced_tokens", "Tokens a constraint forced, appended "
             "without a sampling step", stats.forced_tokens),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
