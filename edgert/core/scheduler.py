"""Iteration-level continuous batching over the paged pool.

Each step the scheduler (1) gives every decoding sequence room for its next token, preempting
the lowest-ranked running sequence when the pool is short (it is recomputed later, keeping its
outputs), (2) admits waiting sequences while places and blocks allow, (3) fills the prefill token
budget with prompt chunks, cut where padding a chunk to its call's width would cost more than
another call, and (4) groups the decoders by length, so one long sequence does not
make fifteen short ones gather its past's worth of padding. After the graph calls the engine
hands back the sampled tokens and `postprocess` does the bookkeeping: computed counts,
prefix-cache registration, forks, appended tokens. `finish` ends a sequence and frees its blocks.

What always holds (tests/test_scheduler.py checks it after every step of random workloads):
- a waiting sequence owns no block; admission takes its blocks all at once or not at all;
- a request `check_admissible` accepted is never refused later: it runs, waits, is preempted
  and recomputed, or finishes with a reason; nothing raises for lack of blocks;
- running places (sequences, plus the forks a first choice will make) never exceed
  max_num_seqs, and every call's padded shape is on the ShapeMenu that warm-up runs;
- copy-on-write destinations are unique and owned by a sequence of the plan.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from edgert.config import COST_BLOCK_TOKENS, SchedulerConfig
from edgert.core.block_allocator import BlockAllocator, NoFreeBlocks
from edgert.core.plan import Call, Row, StepPlan
from edgert.core.prompt_lookup import propose
from edgert.core.sequence import Sequence, Status
from edgert.core.shapes import Shape, ShapeMenu, floor_pow2, pow2

__all__ = ["RequestRejected", "Scheduler", "child_seed"]


class RequestRejected(ValueError):
    """A request that can never run (too long for the model or the pool) or that arrives while
    the queue is full. `status` is the HTTP status the server maps it to."""

    def __init__(self, message: str, status: int = 400, field_name: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field_name


@dataclass
class _Draft:
    """A call being assembled: its rows and the padded T of a prefill (1 for decode)."""

    rows: list[Row]
    width: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, menu: ShapeMenu,
                 new_seq_id: Callable[[], int] | None = None):
        self.config = config
        self.allocator = allocator
        self.menu = menu
        self._new_seq_id = new_seq_id or itertools.count(1 << 40).__next__
        self._waiting: list[tuple[tuple[int, float, int], Sequence]] = []  # heap by rank
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    # ---- the queue -------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> list[Sequence]:
        return [seq for _, seq in sorted(self._waiting, key=lambda e: e[0])]

    @property
    def seats_used(self) -> int:
        return sum(seq.seats for seq in self.running)

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
        if n > cfg.max_num_seqs:
            raise RequestRejected(
                f"n = {n} choices decode together, but this server runs at most "
                f"{cfg.max_num_seqs} sequences at once (--max-num-seqs)", 400, "n")
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
        heapq.heappush(self._waiting, (seq.rank, seq))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is (stop, length, abort, timeout) and free its blocks."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        else:
            self._drop_waiting([seq])
        if self.allocator.has(seq.seq_id):
            self.allocator.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def expire(self, now: float) -> list[Sequence]:
        """Finish every sequence whose deadline has passed, with "timeout"."""
        late = [seq for seq in [*self.running, *(s for _, s in self._waiting)]
                if seq.deadline is not None and now > seq.deadline]
        for seq in late:
            self.finish(seq, "timeout")
        return late

    def _drop_waiting(self, seqs: Iterable[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        kept = [e for e in self._waiting if id(e[1]) not in gone]
        if len(kept) != len(self._waiting):
            self._waiting = kept
            heapq.heapify(self._waiting)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        cows: dict[int, tuple[int, int]] = {}  # seq_id -> its copy-on-write pair this step
        decoders: list[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.rank):  # the oldest get room first
            if seq in self.running and seq.is_decoding and self._make_room(seq, 1, plan, cows):
                decoders.append(seq)
        self._admit(plan)
        prefills = self._plan_prefill(plan, cows)
        decoders = [s for s in decoders if s in self.running]  # a prefill may have preempted
        guessed = self._speculative_calls(decoders)
        plain = [s for s in decoders if all(c.rows[0].seq is not s for c in guessed)]
        plan.calls = [*self._decode_calls(plain), *guessed, *prefills]
        plan.cow_copies = [cows[r.seq.seq_id] for r in plan.rows if r.seq.seq_id in cows]
        self._fork(plan)
        return plan

    def _make_room(self, seq: Sequence, num_new: int, plan: StepPlan,
                   cows: dict[int, tuple[int, int]]) -> bool:
        """Blocks for `seq` to take `num_new` more tokens, plus a private copy of a shared block
        it is about to write into (copy-on-write after a fork). Preempts the lowest-ranked
        running sequence until that holds; False when that was `seq` itself (it waits)."""
        alloc = self.allocator
        while True:
            if alloc.ensure_capacity(seq.seq_id, seq.num_computed + num_new):
                try:
                    copy = alloc.cow_for_write(seq.seq_id, seq.num_computed)
                except NoFreeBlocks:
                    pass
                else:
                    if copy is not None:
                        cows[seq.seq_id] = copy
                    return True
            victim = max(self.running, key=lambda s: s.rank)
            self._preempt(victim, plan, cows)
            if victim is seq:
                return False

    def _preempt(self, seq: Sequence, plan: StepPlan, cows: dict[int, tuple[int, int]]) -> None:
        """Back to waiting with no blocks; its outputs are kept and recomputed on readmission.
        A copy-on-write planned for it this step goes too: its block was just freed."""
        self.running.remove(seq)
        self.allocator.free(seq.seq_id)
        cows.pop(seq.seq_id, None)
        seq.num_computed = seq.num_cached = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq)
        self.add(seq)

    def _admit(self, plan: StepPlan) -> None:
        """Move waiting sequences to running while places and blocks allow: by priority, then
        arrival; the head of the queue is never overtaken, so nobody starves. A block per running
        sequence is held back (their next decode may need one), and nothing preempted in this
        step comes back in it, so admission cannot thrash with preemption. Prefix-cache blocks
        are looked up first and referenced only once the sequence is admitted."""
        alloc, bs = self.allocator, self.allocator.block_size
        while self._waiting:
            seq = self._waiting[0][1]
            if seq in plan.preempted or self.seats_used + seq.seats > self.config.max_num_seqs:
                return
            # Prompt logprobs need every prompt position's logits: no prefix reuse then.
            ids = seq.all_ids if seq.params.prompt_logprobs is None else []
            prefix = alloc.match_prefix(ids)
            computed = len(prefix) * bs
            first = min(seq.num_tokens - computed, self.menu.chunk_limit(computed))
            if not alloc.can_admit(prefix, computed + first, reserve=len(self.running)):
                return
            alloc.admit(seq.seq_id, prefix, computed + first, looked_up=len(ids))
            heapq.heappop(self._waiting)
            seq.num_computed = seq.num_cached = computed
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _plan_prefill(self, plan: StepPlan, cows: dict[int, tuple[int, int]]) -> list[Call]:
        """Prompt chunks within the step's budget of padded tokens. A call is led by the
        oldest sequence still to prefill, whose chunk sets the call's width T; others join while
        the padded shape stays on the menu (short pasts only). Any number of calls per step."""
        budget = self.config.max_num_batched_tokens
        todo = [s for s in self.running if s.num_uncomputed > 1]
        calls: list[Call] = []
        while todo and budget >= 2:
            lead = todo.pop(0)
            if lead not in self.running:
                continue
            cap = min(self.menu.chunk_limit(lead.num_computed), floor_pow2(budget))
            chunk = prefill_chunk(lead.num_uncomputed, cap, self.config.decode_call_cost,
                                  self.config.decode_row_cost)
            width = max(pow2(chunk), 2)
            if not self._make_room(lead, chunk, plan, cows):
                continue
            draft = _Draft([self._row(lead, chunk)], width)
            for other in list(todo):
                if other not in self.running:  # preempted by a room-making above
                    todo.remove(other)
                    continue
                size = pow2(len(draft.rows) + 1)
                if size * width > min(self.menu.t_max, budget):
                    break
                take = min(other.num_uncomputed, width)
                span = max(self.menu.span(s.num_computed, width)
                           for s in [*(r.seq for r in draft.rows), other])
                if not self.menu.prefill_ok(self.menu.prefill_shape(size, width, span)):
                    continue
                if self._make_room(other, take, plan, cows):
                    draft.rows.append(self._row(other, take))
                todo.remove(other)
            draft.rows = [r for r in draft.rows if r.seq in self.running]
            if draft.rows:
                call = self._call(draft)
                budget -= call.shape[0] * call.shape[1]
                calls.append(call)
        # A later room-making may have preempted a sequence planned earlier: drop its row.
        kept = []
        for call in calls:
            rows = [r for r in call.rows if r.seq in self.running]
            if len(rows) < len(call.rows):
                call = self._call(_Draft(rows, call.shape[1]))
            if call is not None:
                kept.append(call)
        return kept

    def _row(self, seq: Sequence, num: int) -> Row:
        start = seq.num_computed
        tokens = tuple(seq.all_ids[start: start + num])
        if seq.wants_prompt_logprobs:
            logits = tuple(range(num))
        elif start + num == seq.num_tokens:
            logits = (num - 1,)
        else:
            logits = ()
        return Row(seq, start, tokens, tuple(self.allocator.block_table(seq.seq_id)), logits)

    def _shape(self, rows: int, width: int, start: int) -> Shape:
        """The padded shape a call of `rows` rows of `width` tokens runs as, its furthest row
        starting at `start`. A lone decoding row takes a padding token where the menu asks
        (pad_lone_decode): two rows through every projection, as in a speculative call's first
        position, and the past gathered once. Always on the menu: a row that generates has
        room for start + 2 tokens."""
        menu = self.menu
        if width == 1 and rows == 1 and menu.pad_lone_decode:
            width = 2
        span = menu.span(start, width)
        return menu.decode_shape(rows, span) if width == 1 else menu.prefill_shape(rows, width,
                                                                                   span)

    def _call(self, draft: _Draft) -> Call | None:
        if not draft.rows:
            return None
        menu = self.menu
        decode = draft.width == 1 or any(r.draft for r in draft.rows)
        shape = self._shape(len(draft.rows), draft.width, max(r.start for r in draft.rows))
        if not (menu.decode_ok(shape) if shape[1] == 1 else menu.prefill_ok(shape)):
            raise AssertionError(f"scheduler bug: call shape {shape} is not on the menu")
        # Tables as the call sees them: each row's own blocks (the call may pad them).
        rows = tuple(replace(r, table=tuple(self.allocator.block_table(r.seq.seq_id)))
                     for r in draft.rows)
        return Call(rows, shape, decode)

    def _decode_calls(self, seqs: list[Sequence]) -> list[Call]:
        """Decoders grouped by how far back they read: at most `max_decode_calls` length
        classes, chosen to minimise the modelled cost (a call's fixed cost, each padded row's,
        each padded row-block's gather; a lone row as the call it runs as, which may be padded
        to two positions), then each class cut to rows the menu allows at its width. Answers
        are the same whatever the grouping: the graph is batch-invariant."""
        if not seqs:
            return []
        menu, cfg = self.menu, self.config
        items = sorted(seqs, key=lambda s: (s.num_computed, s.rank))

        def shape(lo: int, hi: int) -> Shape:
            return self._shape(hi - lo, 1, items[hi - 1].num_computed)

        per = COST_BLOCK_TOKENS  # prices are per 16 tokens of past, whatever the block size

        def cost(lo: int, hi: int) -> int:
            s, t, b = shape(lo, hi)  # each padded position's row cost, each row's gather
            return per * cfg.decode_call_cost + s * (t * per * cfg.decode_row_cost
                                                     + b * menu.block_size)

        n = len(items)
        groups = [(0, n)]
        if cfg.max_decode_calls >= 2 and n > 1:
            best, k = min((cost(0, k) + cost(k, n), k) for k in range(1, n))
            if best < cost(0, n):
                groups = [(0, k), (k, n)]
        calls = []
        for lo, hi in groups:
            while lo < hi:  # the widest slice of the class the menu allows, longest rows last
                top = hi
                while top - lo > 1 and not menu.decode_ok(shape(lo, top)):  # one row fits
                    top -= 1
                draft = _Draft([self._row(s, 1) for s in items[lo:top]], 1)
                calls.append(self._call(draft))
                lo = top
        return [c for c in calls if c is not None]

    def _speculative_calls(self, decoders: list[Sequence]) -> list[Call]:
        """Prompt-lookup speculation: a decoder whose context suggests what follows gets a call
        of its own, its last token plus up to k guesses, every position's logits returned.
        Guesses are opportunistic: capped so the sequence cannot pass max_tokens or the model
        length, and they only use slots the sequence already holds or blocks nobody else could
        use this step (no preemption, no waiting request loses a block to a guess). A miss
        pauses the sequence's guessing for 2, 4, 8, ... up to 32 decode steps."""
        cfg, alloc, menu = self.config, self.allocator, self.menu
        if not decoders or len(decoders) > cfg.speculative_max_seqs:
            return []
        calls = []
        for seq in decoders:
            k = seq.params.speculative_tokens
            k = cfg.speculative_tokens if k is None else k
            k = min(k, seq.params.max_tokens - len(seq.output_ids) - 1,
                    cfg.max_model_len - seq.num_tokens - 1)
            # a constrained row's guesses would need the grammar's mask at every position
            if (k < 1 or not seq.output_ids or seq.wants_prompt_logprobs
                    or seq.params.grammar is not None):
                continue
            if seq.spec_pause > 0:
                seq.spec_pause -= 1
                continue
            guess = propose(seq.all_ids, k, cfg.ngram_min, cfg.ngram_max)
            held = len(alloc.block_table(seq.seq_id)) * alloc.block_size - seq.num_tokens
            if len(guess) > held:  # more blocks only if nobody waits and some stay free
                spare = not self._waiting and alloc.usage().free > len(self.running)
                if not (spare and alloc.ensure_capacity(seq.seq_id,
                                                        seq.num_tokens + len(guess))):
                    guess = guess[:held]
            width = pow2(1 + len(guess))
            if not guess or not menu.prefill_ok(self._shape(1, width, seq.num_computed)):
                continue
            last = self._row(seq, 1)
            row = replace(last, tokens=last.tokens + tuple(guess), draft=len(guess),
                          logits=tuple(range(1 + len(guess))))
            calls.append(self._call(_Draft([row], width)))
        return [c for c in calls if c is not None]

    def _fork(self, plan: StepPlan) -> None:
        """A first choice whose prompt completes in this step forks into its n - 1 other
        choices, which share its blocks (copy-on-write later) and sample from the same logits.
        Their places were held since admission, so max_num_seqs holds."""
        for row in plan.rows:
            parent = row.seq
            if not row.completes or parent.seats == 1:
                continue
            children = []
            for index in range(1, parent.params.n):
                child = Sequence(self._new_seq_id(), parent.request_id, index, parent.prompt_ids,
                                 parent.params, child_seed(parent.seed, index), parent.arrival,
                                 deadline=parent.deadline, status=Status.RUNNING)
                self.allocator.fork(parent.seq_id, child.seq_id)
                self.running.append(child)
                children.append(child)
            plan.forks[parent.seq_id] = children

    # ---- after the graph calls ---------------------------------------------------------------
    def postprocess(self, plan: StepPlan, sampled: list[tuple[Sequence, int]]) -> None:
        """Account a step: tokens now in the pool, full blocks registered for prefix reuse,
        forked choices caught up with their parent (their prefix chains too, right after the
        parent's registration: a chain left behind would make a choice's first commit meet a
        block its parent registered, once a block they reused was evicted), and each sampled
        token appended, in order. A speculative row gets one token per guess the model
        confirmed plus the model's own next one; only the confirmed guesses count as
        computed (the rest of its slots are rewritten before anything reads them)."""
        caching = self.allocator.enable_prefix_caching
        kept = Counter(seq.seq_id for seq, _ in sampled)
        for row in plan.rows:
            seq = row.seq
            confirmed = max(kept[seq.seq_id] - 1, 0) if row.draft else 0
            seq.num_computed = row.start + len(row.tokens) - row.draft + confirmed
            if row.draft:
                seq.spec_misses = 0 if confirmed else seq.spec_misses + 1
                seq.spec_pause = 0 if confirmed else min(1 << seq.spec_misses, MAX_SPEC_PAUSE)
            if caching:
                self.allocator.commit(seq.seq_id, seq.all_ids[: seq.num_computed])
            for child in plan.forks.get(seq.seq_id, ()):
                child.num_computed = seq.num_computed
                if caching:
                    self.allocator.commit(child.seq_id, seq.all_ids[: seq.num_computed])
        for seq, token in sampled:
            seq.output_ids.append(token)


@functools.cache
def _prefill_price(tokens: int, call_cost: int, row_cost: int) -> tuple[int, int]:
    """(cost, first chunk) of the cheapest way to prefill `tokens` tokens in calls whose width
    is padded to a power of two: all at once, or the largest power of two below and the rest
    the same way later."""
    whole = call_cost + row_cost * max(pow2(tokens), 2)
    if tokens <= 2 or pow2(tokens) == tokens:
        return whole, tokens
    first = floor_pow2(tokens)
    split = call_cost + row_cost * first + _prefill_price(tokens - first, call_cost, row_cost)[0]
    return (split, first) if split < whole else (whole, tokens)


def prefill_chunk(tokens: int, cap: int, call_cost: int, row_cost: int) -> int:
    """How many of a prompt's `tokens` uncomputed tokens to take in this call, `cap` (a power
    of two) at most. A chunk's width is padded to a power of two, so a 141-token prompt in one
    call pays for 256 positions; 128 now and 13 (padded to 16) in the next step pay for 144
    and one call more, which the decode cost model (a call's fixed cost, a padded position's
    row cost) prices lower. A prefill's cost grows with its width: 16 / 128 / 256 positions of
    SmolLM2 int8 took 40 / 304 / 623 ms on 2 Zen 3 cores (README). The answers are the same
    either way: chunking is batch-invariant."""
    if tokens >= cap:
        return cap
    return _prefill_price(tokens, call_cost, row_cost)[1]


MAX_SPEC_PAUSE = 32  # decode steps without guessing after repeated misses, at most
_GOLDEN = 0x9E3779B97F4A7C15


def child_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: a pure function of the request's, so each choice samples the same
    whatever batch it lands in (and an n = 1 request with this seed reproduces it)."""
    return (seed + index * _GOLDEN) % (1 << 63)
