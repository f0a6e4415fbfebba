"""The engine step loop: scheduler -> runner/backend -> sampler -> scheduler bookkeeping -> streams.

`LLMEngine` is driven from one thread: `step()` asks the scheduler for a plan, has the runner make
the plan's graph calls, samples the rows that completed, hands the tokens back to the scheduler
(which owns the sequences and the block tables) and feeds them through each request's text
stream, whose stop rules may end a sequence. The engine owns only its requests (streams,
metrics, prompt logprobs); the pool lives in the backend, the sequences in the scheduler.
`LLM` (llm.py) is the offline API on top; `AsyncEngine` (async_engine.py) runs it in a thread.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgert.bundle import Bundle
from edgert.config import EngineConfig, SchedulerConfig
from edgert.core.block_allocator import BlockAllocator, PoolUsage
from edgert.core.plan import StepPlan
from edgert.core.scheduler import RequestRejected, Scheduler
from edgert.core.sequence import Sequence
from edgert.core.shapes import ShapeMenu
from edgert.engine.device_fit import menu_for, pool_blocks
from edgert.outputs import RequestMetrics, RequestOutput, TokenLogprob
from edgert.runner.backends import make_backend
from edgert.runner.kv_pool import KVPool
from edgert.runner.model_runner import ModelRunner
from edgert.sample.grammar import GrammarError, Grammars
from edgert.sample.logprobs import logprobs_of
from edgert.sample.sampler import SamplerRow, sample
from edgert.sampling_params import SamplingParams
from edgert.text.stream import TokenStream
from edgert.text.tokenizer import Tokenizer

__all__ = ["EnginePlan", "EngineStats", "LLMEngine", "RequestRejected", "plan_engine"]

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    steps: int = 0
    decode_calls: int = 0
    decode_seqs: int = 0  # summed decode batch sizes (mean batch = decode_seqs / decode_calls)
    prefill_calls: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed
    draft_tokens: int = 0  # speculative guesses checked
    accepted_tokens: int = 0  # guesses the model confirmed (each one a decode step saved)
    forced_tokens: int = 0  # tokens a constraint forced, appended without a sampling step
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    max_decode_batch: int = 0


@dataclass(frozen=True)
class EnginePlan:
    """What a configuration makes of a bundle before anything is allocated: the pool, the
    scheduler's limits and its shape menu. The engine and `edgert build-engine` (whose TensorRT
    plan must fit the same pool and shapes) both take it from here."""

    block_size: int
    block_bytes: int
    num_blocks: int  # including the null block
    scheduler: SchedulerConfig
    menu: ShapeMenu


def plan_engine(bundle: Bundle, config: EngineConfig) -> EnginePlan:
    cfg = bundle.config
    block_size = config.block_size or int(bundle.kv["block_size"])
    block_bytes = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                         block_size, bundle.kv["dtype"])
    num_blocks = pool_blocks(bundle, config)
    sched = config.scheduler(cfg.max_position_embeddings)
    return EnginePlan(block_size, block_bytes, num_blocks, sched,
                      menu_for(bundle, config, num_blocks, block_size))


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: dict[int, Sequence]  # by choice index; choices 1..n-1 appear when the prompt forks
    streams: dict[int, TokenStream]
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    reported: set[int] = field(default_factory=set)  # choices whose final output was emitted
    matchers: dict[int, Any] = field(default_factory=dict)  # choice -> its grammar's matcher
    ended: str | None = None  # abort/timeout reason for choices that never forked

    @property
    def finished(self) -> bool:
        if self.ended is not None:
            return all(s.finished for s in self.seqs.values())
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs.values())


class LLMEngine:
    def __init__(self, bundle: str | Bundle, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(
            bundle, verify=config.verify_bundle)
        self.model_config = self.bundle.config
        self.tokenizer = Tokenizer.from_bundle(self.bundle)
        plan = plan_engine(self.bundle, config)
        self.block_size, self.block_bytes = plan.block_size, plan.block_bytes
        self.max_model_len, self.menu = plan.scheduler.max_model_len, plan.menu
        self.allocator = BlockAllocator(plan.num_blocks, self.block_size,
                                        enable_prefix_caching=config.enable_prefix_caching)
        self.runner = ModelRunner(make_backend(self.bundle, plan.num_blocks, self.block_size,
                                               config.backend, self.menu), self.block_size)
        if self.runner.lone_row_differs():
            log.info("a lone row decodes to other bits than a batched one on this CPU: "
                     "a lone decoding row takes a padding token")
            self.menu = replace(self.menu, pad_lone_decode=True)
        self._seq_ids = itertools.count(1)
        self.scheduler = Scheduler(plan.scheduler, self.allocator, self.menu,
                                   self._seq_ids.__next__)
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self.grammars = Grammars(self.tokenizer.hf.to_str, self.tokenizer.eos_token_ids,
                                 self.model_config.vocab_size)

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise RequestRejected for what can never run; safe to call from another thread."""
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", 400, "prompt")
        self.scheduler.check_admissible(len(prompt_ids), params.max_tokens, params.n)
        if params.grammar is not None:
            try:
                self.grammars.check(params.grammar)
            except GrammarError as e:
                raise RequestRejected(f"the constraint cannot be compiled: {e}", 400,
                                      "grammar") from None

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
        self._requests[request_id] = _Request(
            request_id, prompt_ids, params,
            RequestMetrics(arrival_time=arrival, prompt_tokens=len(prompt_ids)),
            {0: seq}, {0: self._stream(prompt_ids, params)})
        if params.grammar is not None:
            self._requests[request_id].matchers[0] = self.grammars.matcher(params.grammar)
        self.scheduler.add(seq)
        return request_id

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        return TokenStream.create(self.tokenizer, prompt_ids, params, self.max_model_len)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Cancel a request: its blocks are freed at once."""
        req = self._requests.get(request_id)
        return [] if req is None else self._end_request(req, "abort")

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
        outputs: list[RequestOutput] = []
        for seq in self.scheduler.expire(time.monotonic()):
            req = self._requests.get(seq.request_id)
            if req is not None and req.ended is None:
                outputs.extend(self._end_request(req, "timeout"))
        plan = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if plan:
            self._note_calls(plan)
            results = self.runner.execute(plan)
            sampled, dead = self._sample(plan, results)
            kept, ended = self._feed_streams(sampled)
            self.scheduler.postprocess(plan, [(seq, token) for seq, token, _ in kept])
            for seq, reason in [*dead, *ended]:
                self.scheduler.finish(seq, reason)
        self.stats.steps += 1
        for req in list(self._requests.values()):
            outputs.extend(self._collect(req))
        return outputs

    def _note_calls(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for call in plan.calls:
            if call.is_decode:
                self.stats.decode_calls += 1
                self.stats.decode_seqs += len(call.rows)
                self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(call.rows))
                self.stats.draft_tokens += sum(r.draft for r in call.rows)
                continue
            self.stats.prefill_calls += 1
            for row in call.rows:
                self.stats.prefill_tokens += len(row.tokens)
                metrics = self._requests[row.seq.request_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now

    def _sample(self, plan: StepPlan, results: list[list[np.ndarray]]
                ) -> tuple[list[tuple[Sequence, int, TokenLogprob | None]],
                           list[tuple[Sequence, str]]]:
        """One token for every row that computed its sequence's last token, and for each choice
        forked from it (same logits, its own seed). A speculative row samples every position
        as if its guesses were already outputs (each position's logits are bit-identical to a
        plain decode of that context: the graph is batch-invariant, and the draw depends only
        on (seed, step)) and keeps tokens while they confirm the guesses, plus the first that
        does not: exactly what plain decoding would have produced, sampled or greedy."""
        targets: list[tuple[Sequence, np.ndarray, tuple[int, ...]]] = []
        for call, logits in zip(plan.calls, results):
            for row, rows_logits in zip(call.rows, logits):
                seq = row.seq
                if seq.wants_prompt_logprobs:
                    self._prompt_logprobs(seq, row.tokens, row.start, rows_logits)
                if row.draft:
                    guesses = row.drafts
                    targets.extend((seq, rows_logits[j], guesses[:j])
                                   for j in range(len(guesses) + 1))
                elif row.completes:
                    targets.append((seq, rows_logits[-1], ()))
                    for child in plan.forks.get(seq.seq_id, ()):
                        self._adopt(child)
                        targets.append((child, rows_logits[-1], ()))
        if not targets:
            return [], []
        allowed, dead = self._allowed([s for s, _, _ in targets])
        if dead:
            targets = [t for t in targets if t[0] not in dead]
            if not targets:
                return [], list(dead.items())
        rows = [SamplerRow(params=s.params, seed=s.seed, step=len(s.output_ids) + len(g),
                           prompt_token_ids=np.asarray(s.prompt_ids, np.int32),
                           output_token_ids=np.asarray(s.output_ids + list(g), np.int32),
                           allowed=allowed.get(s.seq_id))
                for s, _, g in targets]
        result = sample(np.stack([lg for _, lg, _ in targets]), rows)
        out: list[tuple[Sequence, int, TokenLogprob | None]] = []
        rejected: set[int] = set()
        for i, (seq, _, guessed) in enumerate(targets):
            if guessed:  # out[-1] is this row's previous position, unless it was rejected
                if seq.seq_id in rejected or out[-1][1] != guessed[-1]:
                    rejected.add(seq.seq_id)
                    continue
                self.stats.accepted_tokens += 1
            lp = None
            if seq.params.logprobs is not None and result.logprobs is not None:
                top = result.top_logprobs[i] if result.top_logprobs else {}
                lp = TokenLogprob(int(result.token_ids[i]), float(result.logprobs[i]),
                                  dict(top or {}))
            out.append((seq, int(result.token_ids[i]), lp))
        return out, list(dead.items())

    def _allowed(self, seqs: list[Sequence]) -> tuple[dict[int, np.ndarray],
                                                      dict[Sequence, str]]:
        """The next-token masks of the constrained sequences (unconstrained ones cost nothing),
        and the constrained ones whose grammar allows no token at all, or that llguidance found
        can never be completed (its error state, which still offers EOS): they finish ("stop"
        when the grammar was complete, else "grammar_dead_end"), never hang."""
        found = []
        for s in seqs:
            m = self._requests[s.request_id].matchers.get(s.index)
            if m is not None:
                found.append((s, m))
        if not found:
            return {}, {}
        masks = self.grammars.allowed([m for _, m in found])
        allowed, dead = {}, {}
        for (s, m), row in zip(found, masks):
            if row.any() and not m.is_error():
                allowed[s.seq_id] = row
            else:
                dead[s] = "stop" if m.is_accepting() and not m.is_error() else "grammar_dead_end"
                self._requests[s.request_id].streams[s.index].end(dead[s])
        return allowed, dead

    def _adopt(self, child: Sequence) -> None:
        req = self._requests[child.request_id]
        req.seqs[child.index] = child
        req.streams[child.index] = self._stream(req.prompt_ids, req.params)
        if req.params.grammar is not None:
            req.matchers[child.index] = self.grammars.matcher(req.params.grammar)

    def _feed_streams(self, sampled: list[tuple[Sequence, int, TokenLogprob | None]]
                      ) -> tuple[list[tuple[Sequence, int, TokenLogprob | None]],
                                 list[tuple[Sequence, str]]]:
        """Each new token through its choice's stream (detokenizer, stop rules), in order. The
        streams decide what is kept: after a stream ends, a sequence's further tokens of this
        step (confirmed guesses past a stop) are dropped. Returns the kept tokens and the
        sequences to finish, for the scheduler."""
        now = time.monotonic()
        kept: list[tuple[Sequence, int, TokenLogprob | None]] = []
        ended: dict[int, tuple[Sequence, str]] = {}
        taken: Counter[int] = Counter()
        queue = deque((seq, token, lp, False) for seq, token, lp in sampled)
        while queue:
            seq, token, lp, was_forced = queue.popleft()
            if seq.seq_id in ended:
                continue
            taken[seq.seq_id] += 1
            kept.append((seq, token, lp))
            self.stats.generated_tokens += 1
            req = self._requests[seq.request_id]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
                req.metrics.cached_prompt_tokens = seq.num_cached
                self.stats.cached_prompt_tokens += seq.num_cached
            stream = req.streams[seq.index]
            if stream.append(token, len(seq.output_ids) + taken[seq.seq_id],
                             seq.num_tokens + taken[seq.seq_id], lp):
                ended[seq.seq_id] = (seq, stream.finish_reason or "stop")
            matcher = req.matchers.get(seq.index)
            if matcher is not None and seq.seq_id not in ended:
                if not matcher.consume_token(token):
                    stream.end("grammar_dead_end")
                elif matcher.is_stopped():  # the grammar is complete: nothing may follow
                    stream.end("stop")
                elif seq.params.logprobs is None and not was_forced:
                    # Tokens the grammar forces (a schema's keys, closing brackets) are
                    # outputs at once: the next step computes them as one chunk instead of a
                    # decode step each. (With logprobs every token needs its own logits.)
                    forced = matcher.compute_ff_tokens()
                    queue.extendleft((seq, t, None, True) for t in reversed(forced))
                    self.stats.forced_tokens += len(forced)
                if stream.finish_reason is not None:
                    ended[seq.seq_id] = (seq, stream.finish_reason)
        return kept, list(ended.values())

    def _prompt_logprobs(self, seq: Sequence, chunk: tuple[int, ...], start: int,
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

    def _collect(self, req: _Request) -> list[RequestOutput]:
        outs = []
        done = req.finished
        first = not req.prompt_logprobs_sent and req.params.prompt_logprobs is not None
        for index in range(req.params.n):
            seq = req.seqs.get(index)
            if seq is None:  # never forked: it ends with the request
                if req.ended is None or index in req.reported:
                    continue
                stream = req.streams.setdefault(index, self._stream(req.prompt_ids, req.params))
                finished, reason = True, req.ended
            else:
                stream, finished, reason = req.streams[index], seq.finished, seq.finish_reason
            text, ids, lps = stream.take()
            if not ids and not text and not (finished and index not in req.reported):
                continue
            out = RequestOutput(req.request_id, index, text, ids, lps,
                                prompt_logprobs=req.prompt_logprobs if first else None,
                                finished=finished, finish_reason=reason)
            if first:
                req.prompt_logprobs_sent, first = True, False
            if finished:
                req.reported.add(index)
            outs.append(out)
        if done:
            req.metrics.finished_time = time.monotonic()
            req.metrics.completion_tokens = sum(len(s.output_ids) for s in req.seqs.values())
            if outs:
                outs[-1].metrics = req.metrics
            del self._requests[req.request_id]
            self.stats.requests_finished += 1
        return outs

    def _end_request(self, req: _Request, reason: str) -> list[RequestOutput]:
        for seq in req.seqs.values():
            self.scheduler.finish(seq, reason)
        req.ended = reason
        return self._collect(req)

    # ---- warm-up -----------------------------------------------------------------------------
    def warmup(self) -> int:
        """Run every shape on the scheduler's menu, largest first, so the first real request
        does not pay for ORT's shape specialisation and ORT's arena reaches its peak now;
        afterwards no new shape reaches the backend. Returns the number of shapes run."""
        return self.runner.warmup(self.menu.all())
