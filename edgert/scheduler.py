"""Iteration-level continuous batching over the paged pool.

Each step the scheduler forms up to two graph calls: one decode call for every running sequence
with exactly one uncomputed token, and one prefill call for sequences with more, chunked under a
per-step token budget so one long prompt cannot stall everyone's decode. Admission is by free
blocks; when a decode needs a block and none is left, the newest running sequence is preempted
(its blocks freed, recomputed later) instead of anything failing. A preempted sequence keeps its
output tokens: on readmission its prompt + outputs are recomputed as one longer prefill.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from edgert.kv_pool import BlockAllocator, NoFreeBlocks
from edgert.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running sequences at once (the decode batch)
    max_num_batched_tokens: int = 256  # prefill tokens per step (padded S x T)
    max_model_len: int = 2048  # prompt + output tokens a sequence may reach
    max_waiting: int = 256  # backpressure: beyond this, new requests are refused

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


class RequestRejected(ValueError):
    """A request that can never run (too long for the model or the pool) or that arrives while
    the queue is full. `status` is the HTTP status the server maps it to."""

    def __init__(self, message: str, status: int = 400, field_name: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field_name


@dataclass
class Batch:
    """One graph call: sequences and how many new tokens each feeds (decode: all 1)."""

    seqs: list[Sequence]
    num_new: list[int]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


@dataclass
class StepPlan:
    decode: Batch | None = None
    prefill: Batch | None = None
    cow_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self._waiting: list[tuple[int, float, int, Sequence]] = []  # heap: priority, arrival
        self._tiebreak = itertools.count()
        self.running: list[Sequence] = []  # admission order: newest last
        self.num_preemptions = 0

    # ---- queue ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def check_admissible(self, prompt_len: int, max_tokens: int, n: int = 1) -> None:
        """Refuse at once what can never run, so nothing waits forever."""
        cfg, alloc = self.config, self.allocator
        total = prompt_len + max_tokens
        if prompt_len < 1:
            raise RequestRejected("prompt is empty", 400, "prompt")
        if total > cfg.max_model_len:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"model length limit of {cfg.max_model_len} tokens", 400,
                "max_tokens" if prompt_len < cfg.max_model_len else "prompt")
        blocks = alloc.blocks_needed(total) * n
        if blocks > alloc.usage().total:
            raise RequestRejected(
                f"prompt + max_tokens ({total} tokens x {n}) needs {blocks} KV blocks but the "
                f"pool has {alloc.usage().total}; lower max_tokens or raise --kv-memory", 400,
                "max_tokens")
        if self.num_waiting >= cfg.max_waiting:
            raise RequestRejected("too many waiting requests; retry later", 429)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        heapq.heappush(self._waiting,
                       (seq.params.priority, seq.arrival, next(self._tiebreak), seq))

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is (finish, abort, timeout) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            entries = [e for e in self._waiting if e[3] is not seq]
            if len(entries) != len(self._waiting):
                self._waiting = entries
                heapq.heapify(self._waiting)
        if self.allocator.has(seq.seq_id):
            self.allocator.free(seq.seq_id)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        decode = [seq for seq in list(self.running)
                  if seq in self.running and seq.is_decoding and self._make_room(seq, 1, plan)]
        decode = [seq for seq in decode if seq in self.running]  # a later one may preempt it
        if decode:
            plan.decode = Batch(decode, [1] * len(decode), is_prefill=False)
        self._admit(plan)
        self._plan_prefill(plan)
        return plan

    def _make_room(self, seq: Sequence, num_new: int, plan: StepPlan) -> bool:
        """Blocks for `seq` to take `num_new` more tokens, plus a private copy of a shared block it
        is about to write into (copy-on-write after a fork). Preempts the newest running
        sequence until that holds; False when the newest was `seq` itself."""
        while True:
            if self.allocator.ensure_capacity(seq.seq_id, seq.num_computed + num_new):
                try:
                    copy = self.allocator.cow_for_write(seq.seq_id, seq.num_computed)
                except NoFreeBlocks:
                    pass
                else:
                    if copy is not None:
                        plan.cow_copies.append(copy)
                    return True
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                raise RuntimeError("the KV pool cannot hold a single sequence")
            self._preempt(victim, plan)
            if victim is seq:
                return False

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.seq_id)
        seq.num_computed = seq.num_cached = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq)
        self.add(seq)

    def _admit(self, plan: StepPlan) -> None:
        """Move waiting sequences to running while sequence slots and blocks allow: by priority,
        then arrival. The head of the queue is never overtaken, so nobody starves. A block per
        running sequence is held back (their next decode may need one), and nothing preempted
        in this step comes back in it, so admission cannot thrash with preemption."""
        while self._waiting and len(self.running) < self.config.max_num_seqs:
            seq = self._waiting[0][3]
            if seq in plan.preempted:
                return
            if not self.allocator.has(seq.seq_id):
                # Prompt logprobs need every prompt position's logits: no prefix reuse then.
                ids = seq.all_ids if seq.params.prompt_logprobs is None else []
                seq.num_cached = seq.num_computed = self.allocator.acquire_prefix(seq.seq_id, ids)
            first = min(seq.num_uncomputed, self.config.max_num_batched_tokens)
            need = (self.allocator.blocks_needed(seq.num_computed + first)
                    - len(self.allocator.block_table(seq.seq_id)))
            if (need + len(self.running) > self.allocator.num_free_blocks
                    or not self.allocator.ensure_capacity(seq.seq_id, seq.num_computed + first)):
                if not self.running:  # nothing running will free blocks: let go of the prefix
                    self.allocator.free(seq.seq_id)
                    seq.num_cached = seq.num_computed = 0
                return
            heapq.heappop(self._waiting)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _plan_prefill(self, plan: StepPlan) -> None:
        """Chunks of the running sequences that still have more than one token to compute. The
        call is padded to S x T, so the budget bounds S x T; the oldest sequence sets T."""
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        chunks: list[int] = []
        width = 0
        for seq in list(self.running):
            if seq not in self.running or seq.is_decoding or seq in plan.preempted:
                continue
            if not seqs:
                width = min(seq.num_uncomputed, budget)
            if (len(seqs) + 1) * width > budget:
                break
            chunk = min(seq.num_uncomputed, width)
            if not self._make_room(seq, chunk, plan):
                continue
            seqs.append(seq)
            chunks.append(chunk)
        live = [(s, c) for s, c in zip(seqs, chunks) if s in self.running]
        if live:
            plan.prefill = Batch([s for s, _ in live], [c for _, c in live], is_prefill=True)
        if plan.decode is not None:  # a prefill's room may have preempted a decoder
            keep = [s for s in plan.decode.seqs if s in self.running]
            plan.decode = Batch(keep, [1] * len(keep), is_prefill=False) if keep else None
