"""The engine step loop: scheduler -> backend -> pool write -> sampler -> streams.

`LLMEngine` owns all mutable state (pool, allocator, sequences) and is driven from one thread:
`step()` runs at most one decode call and one prefill call and returns the outputs produced.
`LLM` is the offline API on top of it; `AsyncEngine` (async_engine.py) runs it in a thread.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace

import numpy as np

from edgert.backend_ort import BackendConfig, OrtBackend
from edgert.bundle import Bundle
from edgert.kv_pool import BlockAllocator, KVPool, PoolUsage
from edgert.outputs import RequestMetrics, RequestOutput, TokenLogprob
from edgert.sampler import SamplerRow, logprobs_of, sample
from edgert.sampling_params import SamplingParams
from edgert.scheduler import Batch, RequestRejected, Scheduler, SchedulerConfig
from edgert.sequence import Sequence, Status
from edgert.step_inputs import bucket, build_step
from edgert.stream import TokenStream
from edgert.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MiB = 1 << 20
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class EngineConfig:
    kv_memory: int = 256 * MiB  # bytes for the KV pool, allocated once at start
    block_size: int | None = None  # None: the bundle's default
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None  # None: the model's context length
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    backend: BackendConfig = field(default_factory=BackendConfig)
    verify_bundle: bool = True
    bucket_shapes: bool = True


@dataclass
class EngineStats:
    steps: int = 0
    decode_calls: int = 0
    decode_seqs: int = 0  # summed decode batch sizes (mean batch = decode_seqs / decode_calls)
    prefill_calls: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    max_decode_batch: int = 0


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence]
    streams: dict[int, TokenStream]  # by choice index
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    reported: set[int] = field(default_factory=set)  # choices whose final output was emitted

    @property
    def finished(self) -> bool:
        return len(self.streams) == self.params.n and all(
            s.finished for s in self.seqs)


class LLMEngine:
    def __init__(self, bundle: str | Bundle, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(
            bundle, verify=config.verify_bundle)
        self.model_config = cfg = self.bundle.config
        self.tokenizer = Tokenizer.from_bundle(self.bundle)
        self.block_size = config.block_size or int(self.bundle.kv["block_size"])
        dtype = np.dtype(self.bundle.kv["dtype"])
        num_blocks = KVPool.num_blocks_for_budget(
            config.kv_memory, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.block_size,
            dtype)
        self.pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.block_size,
                           num_blocks, dtype)
        self.allocator = BlockAllocator(num_blocks, self.block_size,
                                        enable_prefix_caching=config.enable_prefix_caching)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, max_waiting=config.max_waiting), self.allocator)
        self.backend = OrtBackend(self.bundle, self.pool, config.backend)
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count(1)

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise RequestRejected for what can never run; safe to call from another thread."""
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", 400, "prompt")
        self.scheduler.check_admissible(len(prompt_ids), params.max_tokens, params.n)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> str:
        params = params or SamplingParams()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already in use", 400)
        arrival = time.monotonic() if arrival is None else arrival
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(next(self._seq_ids), request_id, 0, prompt_ids, params, seed, arrival,
                       deadline=None if params.timeout is None else arrival + params.timeout)
        req = _Request(request_id, prompt_ids, params,
                       RequestMetrics(arrival_time=arrival, prompt_tokens=len(prompt_ids)),
                       [seq], {0: self._stream(prompt_ids, params)})
        self._requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        return TokenStream.create(self.tokenizer, prompt_ids, params, self.max_model_len)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Cancel a request: its blocks are freed at once."""
        req = self._requests.get(request_id)
        if req is None:
            return []
        return self._finish_request(req, "abort")

    def abort_all(self) -> list[RequestOutput]:
        return [out for rid in list(self._requests) for out in self.abort(rid)]

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def pool_usage(self) -> PoolUsage:
        return self.allocator.usage()

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._expire()
        plan = self.scheduler.schedule()
        if plan.prefill is not None:
            now = time.monotonic()
            for seq in plan.prefill.seqs:
                metrics = self._requests[seq.request_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
        if plan.cow_copies:
            self.pool.copy_blocks(plan.cow_copies)
        self.stats.preemptions = self.scheduler.num_preemptions
        for batch in (plan.decode, plan.prefill):
            if batch is not None:
                self._run(batch)
        self.stats.steps += 1
        for req in list(self._requests.values()):
            out = self._collect(req)
            outputs.extend(out)
        return outputs

    def _expire(self) -> list[RequestOutput]:
        now = time.monotonic()
        out = []
        for req in list(self._requests.values()):
            if any(s.deadline is not None and now > s.deadline and not s.finished
                   for s in req.seqs):
                out.extend(self._finish_request(req, "timeout"))
        return out

    def _run(self, batch: Batch) -> None:
        seqs, num_new = batch.seqs, batch.num_new
        tokens, starts, want = [], [], []
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed
            tokens.append(seq.all_ids[start:start + n])
            starts.append(start)
            completes = start + n == seq.num_tokens
            if seq.wants_prompt_logprobs:
                want.append(np.arange(n))
            elif completes:
                want.append(np.array([n - 1]))
            else:
                want.append(np.zeros(0, np.int64))
        tables = [self.allocator.block_table(s.seq_id) for s in seqs]
        layout = build_step(tokens, starts, tables, want, self.block_size,
                            pad=self.config.bucket_shapes)
        logits, new_kv = self.backend.run(layout.inputs)
        S, T = layout.slot_mapping.shape
        self.pool.write(new_kv[:, :, :S, :T], layout.slot_mapping)
        rows: list[tuple[Sequence, int]] = []
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            seq.num_computed += n
            if self.config.enable_prefix_caching:
                self.allocator.commit(seq.seq_id, seq.all_ids[: seq.num_computed])
            r = layout.logit_rows[i]
            if seq.wants_prompt_logprobs:
                self._prompt_logprobs(seq, tokens[i], starts[i], logits[r])
            if seq.num_computed == seq.num_tokens:
                rows.append((seq, int(r[-1])))
        if batch.is_prefill:
            self.stats.prefill_calls += 1
            self.stats.prefill_tokens += sum(num_new)
        else:
            self.stats.decode_calls += 1
            self.stats.decode_seqs += len(seqs)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(seqs))
        if rows:
            self._sample(rows, logits)

    def _prompt_logprobs(self, seq: Sequence, chunk: list[int], start: int,
                         logits: np.ndarray) -> None:
        """Logprob of each prompt token given the tokens before it: logits at position p score
        the token at p + 1. The first prompt token has none."""
        req = self._requests[seq.request_id]
        if start == 0:
            req.prompt_logprobs = [None]
        nxt = seq.prompt_ids[start + 1: start + 1 + len(chunk)]
        if nxt:
            req.prompt_logprobs.extend(logprobs_of(
                logits[: len(nxt)], np.asarray(nxt, np.int64), seq.params.prompt_logprobs or 0))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After the prompt is computed, the other n-1 choices share its blocks."""
        req = self._requests[parent.request_id]
        children = []
        for index in range(1, parent.params.n):
            child = Sequence(next(self._seq_ids), parent.request_id, index,
                             parent.prompt_ids, parent.params,
                             (parent.seed + index * _GOLDEN) % (1 << 63), parent.arrival,
                             deadline=parent.deadline, num_computed=parent.num_computed,
                             status=Status.RUNNING)
            self.allocator.fork(parent.seq_id, child.seq_id)
            self.scheduler.running.append(child)
            req.seqs.append(child)
            req.streams[index] = self._stream(parent.prompt_ids, parent.params)
            children.append(child)
        return children

    def _sample(self, rows: list[tuple[Sequence, int]], logits: np.ndarray) -> None:
        expanded: list[tuple[Sequence, int]] = []
        for seq, row in rows:
            expanded.append((seq, row))
            if seq.params.n > 1 and seq.index == 0 and not seq.output_ids and len(
                    self._requests[seq.request_id].seqs) == 1:
                expanded.extend((child, row) for child in self._fork(seq))
        sampler_rows = [SamplerRow(params=s.params, seed=s.seed, step=len(s.output_ids),
                                   prompt_token_ids=np.asarray(s.prompt_ids, np.int32),
                                   output_token_ids=np.asarray(s.output_ids, np.int32))
                        for s, _ in expanded]
        picked = logits[np.fromiter((r for _, r in expanded), np.int64, len(expanded))]
        result = sample(picked, sampler_rows)
        now = time.monotonic()
        for i, (seq, _) in enumerate(expanded):
            token = int(result.token_ids[i])
            seq.output_ids.append(token)
            self.stats.generated_tokens += 1
            req = self._requests[seq.request_id]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
                req.metrics.cached_prompt_tokens = seq.num_cached
                self.stats.cached_prompt_tokens += seq.num_cached
            lp = None
            if seq.params.logprobs is not None and result.logprobs is not None:
                top = result.top_logprobs[i] if result.top_logprobs else {}
                lp = TokenLogprob(token, float(result.logprobs[i]), dict(top or {}))
            if req.streams[seq.index].append(token, len(seq.output_ids), seq.num_tokens, lp):
                seq.status = Status.FINISHED
                seq.finish_reason = req.streams[seq.index].finish_reason
                self.scheduler.remove(seq)

    def _collect(self, req: _Request) -> list[RequestOutput]:
        outs = []
        done = req.finished
        for index, stream in sorted(req.streams.items()):
            seq = req.seqs[index]
            text, ids, lps = stream.take()
            first = not req.prompt_logprobs_sent and req.params.prompt_logprobs is not None
            if not ids and not text and not (seq.finished and index not in req.reported):
                continue
            out = RequestOutput(req.request_id, index, text, ids, lps,
                                prompt_logprobs=req.prompt_logprobs if first else None,
                                finished=seq.finished, finish_reason=seq.finish_reason)
            if first:
                req.prompt_logprobs_sent = True
            if seq.finished:
                req.reported.add(index)
            outs.append(out)
        if done:
            req.metrics.finished_time = time.monotonic()
            req.metrics.completion_tokens = sum(len(s.output_ids) for s in req.seqs)
            if outs:
                outs[-1].metrics = req.metrics
            del self._requests[req.request_id]
            self.stats.requests_finished += 1
        return outs

    def _finish_request(self, req: _Request, reason: str) -> list[RequestOutput]:
        for seq in req.seqs:
            if not seq.finished:
                seq.status = Status.FINISHED
                seq.finish_reason = reason
                self.scheduler.remove(seq)
        for index in range(len(req.streams), req.params.n):  # choices never forked
            req.streams[index] = self._stream(req.prompt_ids, req.params)
            req.seqs.append(Sequence(-1, req.request_id, index, req.prompt_ids, req.params, 0,
                                     req.metrics.arrival_time, status=Status.FINISHED,
                                     finish_reason=reason))
        return self._collect(req)

    # ---- warm-up -----------------------------------------------------------------------------
    def warmup(self) -> int:
        """Run the bucketed shapes the scheduler can produce, largest first, so the first real
        request does not pay for ORT's shape specialisation, and so ORT's arena reaches its peak
        now: smaller shapes are carved from the chunks the largest ones left, and resident
        memory stays flat afterwards. Returns the number of shapes run."""
        seqs = sorted({bucket(n) for n in range(1, self.config.max_num_seqs + 1)})
        pool_blocks = min(self.allocator.blocks_needed(self.max_model_len),
                          self.allocator.usage().total)
        blocks = sorted({bucket(n) for n in range(1, pool_blocks + 1)})
        b_max = blocks[-1]
        budget = self.config.max_num_batched_tokens
        # The peaks: the widest decode and the longest prefill chunk over the longest past.
        shapes = {(seqs[-1], 1, b_max), (1, bucket(budget), b_max)}
        for s in seqs:  # then each decode and chunk width once, over short pasts (cheap)
            shapes.update((s, 1, b) for b in blocks[:3])
        for t in sorted({bucket(n) for n in range(2, budget + 1)}):
            shapes.update({(max([1, *(x for x in seqs if x * t <= bucket(budget))]), t, 1),
                           (1, t, 1)})
        for s, t, b in sorted(shapes, key=lambda x: -x[0] * x[1] * x[2]):
            if b * self.block_size >= t:
                self.backend.run(_dummy_inputs(s, t, b))
        return len(shapes)


def _dummy_inputs(s: int, t: int, b: int):
    from edgert.step_inputs import StepInputs

    z = np.zeros
    return StepInputs(z((s, t), np.int32), z((s, t), np.int32), np.full(s, t, np.int32),
                      z(s, np.int32), z((s, b), np.int32), np.arange(s, dtype=np.int32) * t)


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


class LLM:
    """Offline batch generation: `LLM(bundle).generate(prompts, params)`."""

    def __init__(self, bundle: str | Bundle, config: EngineConfig | None = None, **overrides):
        if overrides:
            config = replace(config or EngineConfig(), **overrides)
        self.engine = LLMEngine(bundle, config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids, results = [], {}
        for prompt, p in zip(prompts, plist):
            rid = self.engine.add_request(prompt, p)
            ids.append(rid)
            toks = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            results[rid] = Completion(rid, toks, [Choice(i, "", [], None, [] if p.logprobs
                                                         is not None else None)
                                                  for i in range(p.n)])
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self.accumulate(results[out.request_id], out)
        return [results[r] for r in ids]

    @staticmethod
    def accumulate(c: Completion, out: RequestOutput) -> None:
        ch = c.choices[out.index]
        ch.text += out.text
        ch.token_ids.extend(out.token_ids)
        if out.logprobs is not None and ch.logprobs is not None:
            ch.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            ch.finish_reason = out.finish_reason
        if out.metrics is not None:
            c.metrics = out.metrics
