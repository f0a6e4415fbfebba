"""The scheduler and the block allocator together, model-free: no ONNX, no model, no tensors.

A fake engine (`FakeEngine`) does what `LLMEngine.step` does, minus the graph: expire, schedule,
"run" the plan against a fake KV store, sample, `postprocess`, finish. The fake KV store keeps,
for every slot of every block, the token prefix whose KV the slot would hold (KV at position p
depends on tokens[0..p]); copy-on-write copies and row writes update it exactly where the
runner would. Before a row is "run" the test asserts that every past position it reads through
its block table holds that sequence's own prefix. That single property is what catches a broken
copy-on-write (a copy missing, stale or aimed at someone else's block) and broken prefix-cache
sharing (a hit on a block whose content differs), which bookkeeping checked against itself
cannot.

After every step the fake engine also checks the scheduler's promises (see the docstring of
edgert/core/scheduler.py): schedule() never raises for admitted requests; a waiting sequence owns
no block; places never exceed max_num_seqs and a sequence has at most one row per plan;
copy-on-write destinations are unique and owned by a live sequence of the plan (a pair planned
for a sequence preempted later in the same schedule() is dropped); every call's shape is on the
ShapeMenu and its rows fit it; the allocator's refcounts, free list, LRU and prefix cache are
consistent; prefix-hit metrics count each admission once. At the end every request must finish
within a bounded number of steps (no livelock) and leave the pool empty.

`SchedulerMachine` drives all this with hypothesis over random workloads on tiny pools (shared
system prompts, n > 1, priorities, aborts, timeouts, prefix caching on and off); the plain tests
below pin the regressions one by one, and two of them show that the checks have teeth.

It found one bug, now fixed and pinned by test_forked_choice_commits_after_an_eviction: a forked
choice's prefix chain was left behind its parent's, and its first commit after an eviction
raised ValueError inside the engine step.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgert.config import SchedulerConfig
from edgert.core.block_allocator import BlockAllocator
from edgert.core.plan import StepPlan
from edgert.core.scheduler import RequestRejected, Scheduler
from edgert.core.sequence import Sequence, Status
from edgert.core.shapes import FINE_ROWS, FINE_SPAN, ShapeMenu, bucket, span_bucket
from edgert.sampling_params import SamplingParams

EOS = 0  # the fake model's end-of-sequence token; prompts use 1..3, samples 0..3


class SpyAllocator(BlockAllocator):
    """A BlockAllocator that records every copy-on-write it hands out (and changes nothing),
    so a test can tell which pairs the scheduler planned and then had to drop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cow_log: list[tuple[int, tuple[int, int]]] = []

    def cow_for_write(self, seq_id: int, position: int) -> tuple[int, int] | None:
        pair = super().cow_for_write(seq_id, position)
        if pair is not None:
            self.cow_log.append((seq_id, pair))
        return pair


@dataclass
class FakeRequest:
    """What LLMEngine's _Request tracks for finishing: the choices seen so far, how it ended."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seqs: dict[int, Sequence]  # by choice index; 1..n-1 appear when the prompt forks
    ended: str | None = None  # abort / timeout

    @property
    def finished(self) -> bool:
        if self.ended is not None:
            return all(s.finished for s in self.seqs.values())
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs.values())


@dataclass
class Counts:
    """What happened over a run, for hypothesis events and for the targeted tests."""

    steps: int = 0
    preemptions: int = 0
    forks: int = 0
    cows: int = 0
    cows_dropped: int = 0  # pairs planned for a sequence preempted later in the same schedule()
    preempted_forked: int = 0  # preemptions of a forked choice (or of a parent that forked)
    timeouts: int = 0
    aborts: int = 0
    rejected: int = 0
    admissions: int = 0
    looked_up: int = 0  # tokens the admissions looked up in the prefix cache
    waiting_steps: int = 0  # sum over steps of the number of waiting sequences
    decode_calls: int = 0
    max_rows: int = 0
    reasons: Counter = field(default_factory=Counter)


def _marks_failure(method):
    """Remember that a check failed, so teardown does not pile a second failure on top."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return wrapper


class FakeEngine:
    """LLMEngine.step without tensors, checking the scheduler's promises as it goes."""

    failed = False

    def __init__(self, *, usable_blocks: int, block_size: int, prefix_caching: bool = True,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 256,
                 max_model_len: int = 2048, max_waiting: int = 256, max_decode_calls: int = 2,
                 pad_lone_decode: bool = False, sampler=None) -> None:
        self.allocator = SpyAllocator(usable_blocks + 1, block_size,
                                      enable_prefix_caching=prefix_caching)
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, max_waiting=max_waiting,
            max_decode_calls=max_decode_calls)
        self.menu = ShapeMenu(  # as LLMEngine.__init__ builds it
            max_num_seqs=max_num_seqs, token_budget=max_num_batched_tokens,
            max_blocks=min(self.allocator.blocks_needed(max_model_len), usable_blocks),
            pool_blocks=usable_blocks, block_size=block_size, pad_lone_decode=pad_lone_decode)
        self.menu_shapes = set(self.menu.all())
        self._seq_ids = itertools.count(1)
        self.scheduler = Scheduler(self.config, self.allocator, self.menu, self._seq_ids.__next__)
        self.bs = block_size
        self.now = 0.0
        self.requests: dict[str, FakeRequest] = {}
        self._request_ids = itertools.count()
        # block -> per slot, the token prefix whose KV it holds (None: never written)
        self.store: dict[int, list[tuple[int, ...] | None]] = {
            b: [None] * block_size for b in range(usable_blocks + 1)}
        self.prefix_of_id: dict[int, tuple[int, ...]] = {}
        self.sampler = sampler or self.default_sampler
        self.counts = Counts()
        self.plans: list[StepPlan] = []  # kept only when record_plans is set
        self.record_plans = False

    @staticmethod
    def default_sampler(seq: Sequence) -> int:
        return (seq.seed * 7 + len(seq.output_ids) * 3 + seq.index) % 4

    # ---- requests ------------------------------------------------------------------------
    @_marks_failure
    def submit(self, prompt: list[int], params: SamplingParams, seed: int = 0) -> str | None:
        """LLMEngine.add_request: None when check_admissible refuses it."""
        try:
            self.scheduler.check_admissible(len(prompt), params.max_tokens, params.n)
        except RequestRejected:
            self.counts.rejected += 1
            return None
        rid = f"r{next(self._request_ids)}"
        seq = Sequence(next(self._seq_ids), rid, 0, list(prompt), params, seed, self.now,
                       deadline=None if params.timeout is None else self.now + params.timeout)
        self.requests[rid] = FakeRequest(rid, list(prompt), params, {0: seq})
        self.scheduler.add(seq)
        return rid

    def end_request(self, req: FakeRequest, reason: str) -> None:
        """LLMEngine._end_request: every choice of the request, forked or not."""
        for seq in req.seqs.values():
            self.scheduler.finish(seq, reason)
        req.ended = reason
        self._collect()

    @_marks_failure
    def abort(self, rid: str) -> None:
        self.counts.aborts += 1
        self.end_request(self.requests[rid], "abort")

    def _collect(self) -> None:
        for rid in [r for r, req in self.requests.items() if req.finished]:
            del self.requests[rid]

    def live_seqs(self) -> list[Sequence]:
        return [s for req in self.requests.values() for s in req.seqs.values() if not s.finished]

    # ---- one step ------------------------------------------------------------------------
    @_marks_failure
    def step(self) -> StepPlan:
        sched, alloc = self.scheduler, self.allocator
        self.counts.steps += 1
        late = sched.expire(self.now)
        assert all(s.deadline is not None and self.now > s.deadline for s in late)
        for seq in late:
            self.counts.timeouts += 1
            req = self.requests.get(seq.request_id)
            if req is not None and req.ended is None:
                self.end_request(req, "timeout")
        assert not [s for s in self.live_seqs() if s.deadline is not None and
                    self.now > s.deadline], "a sequence past its deadline is still queued"
        tables_before = alloc.debug_state().tables
        queries = alloc.stats.prefix_queries_tokens
        hits = alloc.stats.prefix_hit_tokens
        alloc.cow_log.clear()
        try:
            plan = sched.schedule()
        except Exception as exc:  # invariant 1
            raise AssertionError(
                f"schedule() raised {exc!r} with only admissible requests queued") from exc
        if self.record_plans:
            self.plans.append(plan)
        self._check_plan(plan, tables_before, alloc.stats.prefix_queries_tokens - queries,
                         alloc.stats.prefix_hit_tokens - hits)
        self._run(plan)
        sampled = self._sample(plan)
        try:
            sched.postprocess(plan, [(seq, tok) for seq, tok in sampled])
        except Exception as exc:
            raise AssertionError(f"postprocess() raised {exc!r}") from exc
        self._learn_prefix_ids()
        for seq, tok in sampled:  # the token stream's stop rules
            if len(seq.output_ids) >= seq.params.max_tokens:
                self.scheduler.finish(seq, "length")
            elif tok == EOS and not seq.params.ignore_eos:
                self.scheduler.finish(seq, "stop")
            if seq.finished:
                self.counts.reasons[seq.finish_reason] += 1
        self._collect()
        self.counts.waiting_steps += sched.num_waiting
        self.now += 1.0
        self.check_state()
        return plan

    @_marks_failure
    def drain(self, max_steps: int | None = None) -> int:
        """Step with no new arrivals until every request has finished (invariant 7)."""
        if max_steps is None:
            work = sum(req.params.n * (len(req.prompt) + req.params.max_tokens)
                       for req in self.requests.values())
            max_steps = 50 + 5 * work  # runs take at most ~1 step per token of work
        steps = 0
        while self.requests:
            assert steps < max_steps, (
                f"livelock: {len(self.requests)} request(s) unfinished after {steps} steps "
                f"(running {[s.seq_id for s in self.scheduler.running]}, waiting "
                f"{[s.seq_id for s in self.scheduler.waiting]}, pool {self.allocator.usage()})")
            self.step()
            steps += 1
        self.check_empty()
        return steps

    def check_empty(self) -> None:
        sched, u = self.scheduler, self.allocator.usage()
        assert not sched.running, f"nothing should be running: {sched.running}"
        assert sched.num_waiting == 0, f"nothing should be waiting: {sched.waiting}"
        assert u.used == 0, f"every block should be released at the end: {u}"
        assert u.used + u.cached + u.free == u.total

    # ---- the fake runner -----------------------------------------------------------------
    def _slot(self, table: tuple[int, ...], p: int) -> tuple[int, int]:
        return table[p // self.bs], p % self.bs

    def _run(self, plan: StepPlan) -> None:
        """Copy-on-write first (every source read before any write), then the calls in order,
        each row checking the KV it reads before writing its own."""
        copies = {src: list(self.store[src]) for src, _ in plan.cow_copies}
        for src, dst in plan.cow_copies:
            self.store[dst] = list(copies[src])
        for call in plan.calls:
            for row in call.rows:
                ids = row.seq.all_ids
                for p in range(row.start):
                    block, off = self._slot(row.table, p)
                    assert self.store[block][off] == tuple(ids[: p + 1]), (
                        f"sequence {row.seq.seq_id} reads wrong KV at position {p} (block "
                        f"{block}, slot {off}): holds {self.store[block][off]}, expected the "
                        f"prefix {ids[: p + 1]}")
                for i in range(len(row.tokens)):
                    block, off = self._slot(row.table, row.start + i)
                    assert block != 0, "a row writes into the null block"
                    self.store[block][off] = tuple(ids[: row.start + i + 1])

    def _sample(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        sampled = []
        for row in plan.rows:
            if not row.completes:
                assert row.seq.seq_id not in plan.forks, "a fork from a row that does not sample"
                continue
            sampled.append((row.seq, self.sampler(row.seq)))
            for child in plan.forks.get(row.seq.seq_id, []):
                self.requests[child.request_id].seqs[child.index] = child  # LLMEngine._adopt
                sampled.append((child, self.sampler(child)))
        return sampled

    def _learn_prefix_ids(self) -> None:
        """Each prefix id must always denote the same token prefix (ids are never reused)."""
        state = self.allocator.debug_state()
        by_id = {s.seq_id: s for s in self.scheduler.running}
        for sid, chain in state.prefix_chains.items():
            ids = by_id[sid].all_ids
            assert len(chain) <= by_id[sid].num_computed // self.bs
            for i, pid in enumerate(chain):
                want = tuple(ids[: (i + 1) * self.bs])
                got = self.prefix_of_id.setdefault(pid, want)
                assert got == want, f"prefix id {pid} names both {got} and {want}"

    # ---- the checks ----------------------------------------------------------------------
    def _check_plan(self, plan: StepPlan, before: dict[int, tuple[int, ...]], queries: int,
                    hits: int) -> None:
        """Everything a plan promises, checked before it is run. `before`: the block tables
        as they were when schedule() was called."""
        sched, alloc, menu, bs = self.scheduler, self.allocator, self.menu, self.bs
        cfg = self.config
        running = {s.seq_id: s for s in sched.running}
        children = {c.seq_id for kids in plan.forks.values() for c in kids}
        self.counts.preemptions += len(plan.preempted)
        self.counts.forks += len(children)
        self.counts.cows += len(plan.cow_copies)
        self.counts.preempted_forked += sum(
            1 for s in plan.preempted if s.index > 0 or s.params.n > 1)

        # Invariant 2 right after schedule(), and who is where.
        self._check_queues()
        # Invariant 3: places, rows per call, one row per sequence.
        places = sum(1 if s.seq_id in plan.forks else s.seats for s in sched.running)
        assert places <= cfg.max_num_seqs, (
            f"{places} running places (with the choices still to fork) > max_num_seqs "
            f"{cfg.max_num_seqs}")
        row_ids = [row.seq.seq_id for row in plan.rows]
        assert len(row_ids) == len(set(row_ids)), f"a sequence has two rows in a plan: {row_ids}"
        # Invariant 5: shapes on the menu, rows that fit them and are what the pool says.
        for call in plan.calls:
            s, t, b = call.shape
            assert call.rows, "an empty call"
            assert len(call.rows) <= cfg.max_num_seqs, (
                f"a call of {len(call.rows)} rows > max_num_seqs {cfg.max_num_seqs}")
            self.counts.max_rows = max(self.counts.max_rows, len(call.rows))
            if t == 1:
                self.counts.decode_calls += 1
                assert menu.decode_ok(call.shape), f"decode shape {call.shape} is off the menu"
            else:
                assert menu.prefill_ok(call.shape), f"prefill shape {call.shape} is off the menu"
            assert call.shape in self.menu_shapes, f"{call.shape} is not in menu.all()"
            assert len(call.rows) <= s, f"{len(call.rows)} rows in a call of shape {call.shape}"
            for row in call.rows:
                seq = row.seq
                need = alloc.blocks_needed(row.start + len(row.tokens))
                assert seq.seq_id in running and seq.status is Status.RUNNING, (
                    f"a row for sequence {seq.seq_id}, which is not running")
                assert 1 <= len(row.tokens) <= t, f"{len(row.tokens)} tokens in {call.shape}"
                assert -(-(row.start + t) // bs) <= b, (
                    f"row at {row.start} with T={t} needs more than B={b} blocks")
                assert row.start == seq.num_computed, "a row must start where the pool ends"
                assert row.tokens == tuple(seq.all_ids[row.start: row.start + len(row.tokens)])
                assert list(row.table) == alloc.block_table(seq.seq_id), (
                    f"row table {row.table} of sequence {seq.seq_id} is stale: the allocator "
                    f"has {alloc.block_table(seq.seq_id)}")
                assert len(row.table) >= need and 0 not in row.table[:need], (
                    f"table {row.table} does not cover {row.start + len(row.tokens)} slots")
                if row.completes:
                    assert len(row.tokens) - 1 in row.logits, "a completing row needs logits"
        # Invariant 4: copy-on-write pairs.
        dsts = [dst for _, dst in plan.cow_copies]
        assert len(dsts) == len(set(dsts)), f"duplicate copy-on-write destinations: {dsts}"
        holders: dict[int, set[int]] = {}
        for sid, table in alloc.debug_state().tables.items():
            for block in table:
                holders.setdefault(block, set()).add(sid)
        row_of = {row.seq.seq_id: row for row in plan.rows}
        for src, dst in plan.cow_copies:
            assert 0 not in (src, dst) and src != dst, f"bad copy-on-write pair {(src, dst)}"
            owners = [sid for sid, row in row_of.items() if dst in row.table]
            assert len(owners) == 1 and owners[0] in running, (
                f"copy-on-write destination {dst} is not in the table of exactly one running "
                f"sequence of the plan (owners {owners})")
            row = row_of[owners[0]]
            idx = row.start // bs
            assert row.table[idx] == dst and before.get(owners[0], ())[idx: idx + 1] == (src,), (
                f"copy-on-write {src} -> {dst} is not sequence {owners[0]}'s private copy of "
                f"the shared block it writes first (table before {before.get(owners[0])}, now "
                f"{row.table}, writing from {row.start}): a stale pair overwrites other KV")
            kids = {c.seq_id for c in plan.forks.get(owners[0], [])}
            assert holders.get(dst, set()) <= {owners[0], *kids}, (
                f"copy-on-write destination {dst} is shared with {holders.get(dst)}")
        planned = {(sid, pair) for sid, pair in alloc.cow_log}
        stale = {(sid, pair) for sid, pair in planned if sid not in running}
        self.counts.cows_dropped += len(stale)
        kept = {pair for sid, pair in planned if sid in running}
        assert not {pair for _, pair in stale} & set(plan.cow_copies), (
            f"copy-on-write pairs of preempted sequences survived in the plan: {stale}")
        assert kept == set(plan.cow_copies), (
            f"the plan's copies {plan.cow_copies} differ from those made for its running "
            f"sequences {kept}")
        # Every block a row writes is private to it (or shared only with its own new forks).
        for row in plan.rows:
            kids = {c.seq_id for c in plan.forks.get(row.seq.seq_id, [])}
            for p in range(row.start, row.start + len(row.tokens)):
                block = row.table[p // bs]
                assert holders[block] <= {row.seq.seq_id, *kids}, (
                    f"sequence {row.seq.seq_id} writes position {p} into block {block}, "
                    f"shared with {holders[block] - {row.seq.seq_id}}")
        # Forks: n - 1 choices of a parent whose prompt completes now, sharing its table.
        for parent_id, kids in plan.forks.items():
            parent = running[parent_id]
            assert parent.index == 0 and not parent.output_ids and len(kids) == parent.params.n - 1
            for child in kids:
                assert alloc.block_table(child.seq_id) == alloc.block_table(parent_id)
        # Prefix metrics: each admission is counted once, when it is made.
        admitted = [s for s in sched.running if s.seq_id not in before and s.seq_id not in
                    children]
        admitted += [s for s in plan.preempted if s.seq_id not in before]
        looked_up = sum(len(s.all_ids) for s in admitted if s.params.prompt_logprobs is None)
        self.counts.admissions += len(admitted)
        self.counts.looked_up += looked_up
        assert queries == looked_up, (
            f"prefix_queries_tokens grew by {queries} this step; the {len(admitted)} "
            f"admission(s) made looked up {looked_up} tokens")
        assert 0 <= hits <= queries and hits % bs == 0

    def _check_queues(self) -> None:
        sched, alloc = self.scheduler, self.allocator
        waiting = sched.waiting
        for seq in waiting:  # invariant 2
            assert not alloc.has(seq.seq_id), f"waiting sequence {seq.seq_id} owns blocks"
            assert seq.status is Status.WAITING
        for seq in sched.running:
            assert seq.status is Status.RUNNING and alloc.has(seq.seq_id)
        ids = [s.seq_id for s in [*sched.running, *waiting]]
        assert len(ids) == len(set(ids)), "a sequence is queued twice"
        assert set(alloc.debug_state().tables) == {s.seq_id for s in sched.running}, (
            "only running sequences may own blocks")

    @_marks_failure
    def check_state(self) -> None:
        """Between steps: queues, places, KV of every running sequence, allocator bookkeeping."""
        sched, alloc, cfg = self.scheduler, self.allocator, self.config
        self._check_queues()
        queued = {s.seq_id for s in [*sched.running, *sched.waiting]}
        assert queued == {s.seq_id for s in self.live_seqs()}, (
            "every unfinished choice is running or waiting, and nothing else is")
        assert sched.seats_used <= cfg.max_num_seqs, (
            f"seats_used {sched.seats_used} > max_num_seqs {cfg.max_num_seqs}")
        for seq in [*sched.running, *sched.waiting]:
            assert seq.num_uncomputed >= 1, f"sequence {seq.seq_id} has nothing left to run"
        for seq in sched.running:  # the KV it has computed is intact
            table = alloc.block_table(seq.seq_id)
            assert len(table) >= alloc.blocks_needed(seq.num_computed)
            ids = seq.all_ids
            for p in range(seq.num_computed):
                block, off = self._slot(tuple(table), p)
                assert self.store[block][off] == tuple(ids[: p + 1]), (
                    f"KV of sequence {seq.seq_id} at position {p} (block {block}) was "
                    f"overwritten: {self.store[block][off]}")
        check_allocator(alloc, self.store, self.prefix_of_id)


def check_allocator(alloc: BlockAllocator, store, prefix_of_id) -> None:
    """Invariant 6 (as AllocatorMachine in test_kv_pool.py): refcounts equal the tables holding
    a block, free / LRU / used partition the pool, and the prefix cache describes what the
    cached blocks really hold."""
    s, u = alloc.debug_state(), alloc.usage()
    refs = Counter(b for t in s.tables.values() for b in t)
    assert 0 not in refs and s.refcounts[0] == 0, "the null block is in a table"
    bad = [b for b in range(alloc.num_blocks) if s.refcounts[b] != refs.get(b, 0)]
    assert not bad, f"refcounts of blocks {bad} differ from the tables holding them"
    free, lru = set(s.free), set(s.lru)
    used = {b for b in range(1, alloc.num_blocks) if s.refcounts[b] > 0}
    assert len(free) == len(s.free) and len(lru) == len(s.lru), "a block is listed twice"
    assert not (free & lru) and not (free & used) and not (lru & used)
    assert free | lru | used == set(range(1, alloc.num_blocks)), "a block went missing"
    assert (u.used, u.cached, u.free) == (len(used), len(lru), len(free))
    registered = {c.block for c in s.cached}
    assert lru <= registered and not (free & registered)
    keys = {(c.parent_prefix_id, c.tokens) for c in s.cached}
    assert len(keys) == len(s.cached), "two blocks cached under one key"
    bs = alloc.block_size
    for c in s.cached:
        assert c.prefix_id in prefix_of_id, f"cached block {c.block} of an unknown prefix"
        prefix = prefix_of_id[c.prefix_id]
        assert c.tokens == prefix[-bs:]
        want = [prefix[: len(prefix) - bs + o + 1] for o in range(bs)]
        assert store[c.block] == want, f"cached block {c.block} holds other KV than its key"


# --------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------

tokens = st.integers(1, 3)  # a small alphabet: block contents repeat under different prefixes


# One request: which system prompt (-1: none), suffix, n, priority, max_tokens, timeout,
# ignore_eos, prompt_logprobs, seed.
request_specs = st.tuples(
    st.integers(-1, 2), st.lists(tokens, max_size=4), st.integers(1, 3), st.integers(0, 2),
    st.integers(1, 12), st.none() | st.none() | st.integers(2, 24), st.booleans(),
    st.sampled_from([None, None, None, 0]), st.integers(0, 3))


class SchedulerMachine(RuleBasedStateMachine):
    """Random workloads on a tiny pool; every step is checked by FakeEngine."""

    @initialize(
        block_size=st.integers(2, 4), usable=st.integers(4, 24), max_num_seqs=st.integers(1, 6),
        budget=st.integers(4, 32), caching=st.booleans(), decode_calls=st.integers(1, 2),
        pad_lone_decode=st.booleans(), max_model_len=st.integers(24, 64),
        max_waiting=st.integers(3, 12),
        systems=st.lists(st.lists(tokens, min_size=2, max_size=10), min_size=1, max_size=3),
        first=st.lists(request_specs, min_size=2, max_size=8))
    def setup(self, block_size, usable, max_num_seqs, budget, caching, decode_calls,
              pad_lone_decode, max_model_len, max_waiting, systems, first) -> None:
        self.draws: list[int] = [1]
        self.cursor = 0
        self.engine = FakeEngine(
            usable_blocks=usable, block_size=block_size, prefix_caching=caching,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
            max_waiting=max_waiting, max_decode_calls=decode_calls,
            pad_lone_decode=pad_lone_decode, sampler=self._sample)
        self.systems = systems
        note(f"pool {usable} x {block_size}, {self.engine.config}, caching {caching}")
        self.submit(first)

    def _sample(self, seq: Sequence) -> int:
        self.cursor += 1
        return self.draws[self.cursor % len(self.draws)]

    @rule(requests=st.lists(request_specs, min_size=1, max_size=3))
    def submit(self, requests) -> None:
        """A burst of requests, most of them sharing a system prompt."""
        for system, suffix, n, priority, max_tokens, timeout, ignore_eos, plp, seed in requests:
            prompt = (self.systems[system % len(self.systems)] if system >= 0 else []) + suffix
            params = SamplingParams(max_tokens=max_tokens, n=n, priority=priority,
                                    timeout=timeout, ignore_eos=ignore_eos, prompt_logprobs=plp)
            if self.engine.submit(prompt, params, seed) is None:
                event("request rejected")

    @rule(draws=st.lists(st.integers(0, 7), min_size=1, max_size=8), repeat=st.integers(1, 4))
    def step(self, draws, repeat) -> None:
        self.draws = draws
        for _ in range(repeat):
            self.engine.step()

    @rule(dt=st.integers(1, 6))
    def tick(self, dt) -> None:
        self.engine.now += dt

    @precondition(lambda self: bool(self.engine.requests))
    @rule(data=st.data())
    def abort(self, data) -> None:
        self.engine.abort(data.draw(st.sampled_from(sorted(self.engine.requests))))

    @rule()
    def drain(self) -> None:
        self.engine.drain()

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "engine"):
            self.engine.check_state()

    def teardown(self) -> None:
        if not hasattr(self, "engine") or self.engine.failed:
            return
        c = self.engine.counts
        self.engine.drain()
        for name, happened in [("preemption", c.preemptions), ("fork", c.forks),
                               ("copy-on-write", c.cows), ("stale cow dropped", c.cows_dropped),
                               ("forked choice preempted", c.preempted_forked),
                               ("timeout", c.timeouts), ("abort", c.aborts),
                               ("prefix hit", self.engine.allocator.stats.prefix_hit_tokens),
                               ("eviction", self.engine.allocator.stats.evictions)]:
            if happened:
                event(name)


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase


# --------------------------------------------------------------------------------------------
# Regressions, one scenario each
# --------------------------------------------------------------------------------------------

def _ignore_eos(**kwargs) -> SamplingParams:
    return SamplingParams(ignore_eos=True, **kwargs)


def test_shared_system_prompt_on_a_small_pool_does_not_crash() -> None:
    """The issue: a 10-block pool, one ~3-block system prompt, many requests at once. The old
    scheduler took prefix references for waiting sequences, starved the pool and raised "the KV
    pool cannot hold a single sequence"."""
    eng = FakeEngine(usable_blocks=10, block_size=4, max_model_len=64)  # BlockAllocator(11, 4)
    system = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    for i in range(9):  # nine different suffixes, nine output lengths
        assert eng.submit(system + [1 + i % 3, 1 + i // 3], _ignore_eos(max_tokens=2 + i))
    eng.drain()  # never raises, finishes everyone, frees the pool (FakeEngine.drain checks)
    assert eng.counts.reasons["length"] == 9, eng.counts.reasons
    assert eng.counts.waiting_steps > 0, "the pool should not hold everyone at once"
    assert eng.allocator.stats.prefix_hit_tokens > 0, "the system prompt was never reused"


def test_prefix_metrics_count_each_admission_once() -> None:
    """Sequences waiting behind a full pool are looked up in the prefix cache every step, but
    only the admissions made may count towards the hit rate."""
    eng = FakeEngine(usable_blocks=10, block_size=4, max_num_seqs=2, max_model_len=64)
    system = [3, 1, 2, 2, 1, 3, 3, 1]
    prompts = [system + [1 + i % 3] * (1 + i % 2) for i in range(10)]
    for prompt in prompts:
        assert eng.submit(prompt, _ignore_eos(max_tokens=8)) is not None
    eng.drain()
    stats = eng.allocator.stats
    assert eng.counts.waiting_steps > 3 * eng.counts.admissions, "nobody waited long"
    assert eng.counts.preemptions == 0  # so each request was admitted exactly once
    assert eng.counts.admissions == len(prompts)
    assert stats.prefix_queries_tokens == sum(map(len, prompts)), (
        f"prefix_queries_tokens {stats.prefix_queries_tokens} != {sum(map(len, prompts))}, the "
        "prompt tokens of the admissions made")
    assert 0 < stats.prefix_hit_tokens <= stats.prefix_queries_tokens


def test_n_choices_never_exceed_max_num_seqs() -> None:
    eng = FakeEngine(usable_blocks=64, block_size=4, max_num_seqs=4, max_model_len=64)
    for i in range(5):
        assert eng.submit([1, 2, 3, 1 + i % 3], _ignore_eos(max_tokens=3 + i, n=3)) is not None
    eng.record_plans = True
    eng.drain()  # FakeEngine checks seats_used and rows per call after every step
    assert eng.counts.forks == 5 * 2 and eng.counts.max_rows >= 3
    assert all(len(call.rows) <= 4 for plan in eng.plans for call in plan.calls)
    with pytest.raises(RequestRejected, match="n = 5") as info:
        eng.scheduler.check_admissible(4, 3, n=5)
    assert info.value.field == "n" and info.value.status == 400


def _decode_plan_with_everyone(max_decode_calls: int, *, past: int = 200, short: int = 12,
                               pad_lone_decode: bool = False) -> StepPlan:
    """One sequence with `past` tokens of past and `short` short ones, all decoding in one
    step."""
    eng = FakeEngine(usable_blocks=256, block_size=16, max_num_seqs=16,
                     max_num_batched_tokens=64, max_model_len=512,
                     max_decode_calls=max_decode_calls, pad_lone_decode=pad_lone_decode)
    eng.submit([1 + i % 3 for i in range(past)], _ignore_eos(max_tokens=40))
    while not eng.scheduler.running or not eng.scheduler.running[0].output_ids:
        assert eng.counts.steps < 50, "the long prompt's prefill never completed"
        eng.step()  # the long prompt's prefill, chunk by chunk
    for i in range(short):
        eng.submit([2, 1, 1 + i % 3, 3], _ignore_eos(max_tokens=8))
    for _ in range(4):
        plan = eng.step()
        if len(plan.rows) == short + 1 and all(call.is_decode for call in plan.calls):
            return plan
    raise AssertionError(f"the {short + 1} sequences never decoded in the same step")


def test_decode_length_classes_split_one_long_sequence_from_short_ones() -> None:
    plan = _decode_plan_with_everyone(max_decode_calls=2)
    assert len(plan.calls) == 2, [call.shape for call in plan.calls]
    short, long = sorted(plan.calls, key=lambda call: call.shape[2])
    assert len(short.rows) == 12 and short.shape[2] <= 2, short.shape
    assert len(long.rows) == 1 and long.rows[0].start >= 200 and long.shape[2] >= 13, long.shape


def test_one_decode_call_when_length_classes_are_off() -> None:
    plan = _decode_plan_with_everyone(max_decode_calls=1)
    assert len(plan.calls) == 1 and len(plan.calls[0].rows) == 13, plan.calls[0].shape


@pytest.mark.parametrize("pad", [False, True])
def test_a_split_off_lone_row_is_priced_as_the_call_it_runs_as(pad: bool) -> None:
    """~400 tokens of past beside four short rows: by the model's prices (160 a call, 12 a
    row, 1 a row-block) the long row alone is worth its own call (416 < 424 together) unless
    it runs padded to two positions (428), which costs a second row's projections."""
    plan = _decode_plan_with_everyone(max_decode_calls=2, past=400, short=4,
                                      pad_lone_decode=pad)
    if pad:
        assert len(plan.calls) == 1 and len(plan.calls[0].rows) == 5, plan.calls
    else:
        assert sorted(len(call.rows) for call in plan.calls) == [1, 4], plan.calls


@pytest.mark.parametrize("usable", [16, 8])
def test_a_lone_stream_decodes_with_a_padding_token_where_the_menu_asks(usable: int) -> None:
    """pad_lone_decode (the engine's probe found a one-row kernel path): with
    max_num_seqs=1, every decode call is one row padded to two tokens, up to a sequence that
    fills the model length (16 blocks) or the whole pool (8 blocks)."""
    eng = FakeEngine(usable_blocks=usable, block_size=4, max_num_seqs=1, max_model_len=64,
                     pad_lone_decode=True)
    eng.record_plans = True
    total = 4 * usable
    eng.submit([1] * 20, _ignore_eos(max_tokens=total - 20))
    eng.drain()
    decodes = [call for plan in eng.plans for call in plan.calls if call.is_decode]
    assert len(decodes) == total - 21
    assert {(len(c.rows), len(c.rows[0].tokens), c.shape[:2]) for c in decodes} == {(1, 1, (1, 2))}
    assert max(c.shape[2] for c in decodes) == usable and eng.counts.reasons["length"] == 1


@pytest.mark.parametrize("streams", [1, 8])
def test_long_decode_tables_pad_a_quarter_octave_in_narrow_calls(streams: int) -> None:
    """Past FINE_SPAN blocks a call of up to FINE_ROWS rows pads its table by at most 1.25x (a
    4,100-token row read 384 blocks on the 1.5x ladder, 320 now); wider calls keep the 1.5x
    ladder. Every call's shape is on the warmed menu (FakeEngine checks)."""
    eng = FakeEngine(usable_blocks=1200, block_size=2, max_num_seqs=8, max_model_len=400)
    eng.record_plans = True
    for _ in range(streams):
        eng.submit([1] * 120, _ignore_eos(max_tokens=250))
    eng.drain()
    decodes = [c for plan in eng.plans for c in plan.calls if c.is_decode]

    def pad(call) -> float:
        return call.shape[2] / eng.menu.span(max(r.start for r in call.rows), 1)

    narrow = [c for c in decodes if bucket(len(c.rows)) <= FINE_ROWS]
    wide = [c for c in decodes if c not in narrow]
    assert all(c.shape[2] == span_bucket(c.shape[2]) for c in narrow)
    assert all(c.shape[2] == bucket(c.shape[2]) for c in wide)
    long = [c for c in (narrow if streams <= FINE_ROWS else wide) if c.shape[2] > FINE_SPAN]
    assert len(long) > 50, "the rows read past FINE_SPAN blocks for many steps"
    if streams <= FINE_ROWS:
        assert max(map(pad, long)) <= 1.25
    else:
        assert max(map(pad, long)) > 1.25


def _stale_cow_engine() -> FakeEngine:
    """A parent and its forked choice decode into a shared block (the parent gets a
    copy-on-write pair), then, in the same schedule(), the better-ranked long prompt's next
    prefill chunk needs the pool and preempts the choice and the parent: the parent's pair must
    go, its destination block now belongs to the long prompt. Prefix caching is off: this is
    about copy-on-write alone."""
    eng = FakeEngine(usable_blocks=7, block_size=2, max_num_seqs=3, max_num_batched_tokens=12,
                     max_model_len=32, prefix_caching=False)
    eng.submit([1] * 11, _ignore_eos(max_tokens=1))
    eng.submit([1, 2, 3], _ignore_eos(max_tokens=2, n=2, priority=1))
    return eng


def test_stale_copy_on_write_pairs_are_dropped() -> None:
    eng = _stale_cow_engine()
    eng.drain()  # invariant 4 is checked on every plan
    assert eng.counts.cows_dropped >= 1 and eng.counts.preempted_forked >= 2, eng.counts
    assert eng.counts.reasons["length"] == 3


def test_a_stale_copy_on_write_pair_would_be_caught() -> None:
    """The check above has teeth: put the dropped pair back and the plan check fails."""
    eng = _stale_cow_engine()
    schedule = eng.scheduler.schedule

    def schedule_keeping_stale_pairs() -> StepPlan:
        plan = schedule()
        plan.cow_copies += [pair for sid, pair in eng.allocator.cow_log
                            if not any(s.seq_id == sid for s in eng.scheduler.running)]
        return plan

    eng.scheduler.schedule = schedule_keeping_stale_pairs
    with pytest.raises(AssertionError, match="private copy"):
        eng.drain()


def test_a_missing_copy_on_write_would_be_caught() -> None:
    """And the fake KV store has teeth: skip every copy (and hide it from the spy) and a forked
    choice reads a block that was never filled."""
    eng = FakeEngine(usable_blocks=16, block_size=2, max_num_seqs=3, max_model_len=32)
    eng.submit([1, 2, 3], _ignore_eos(max_tokens=3, n=3))
    schedule = eng.scheduler.schedule

    def schedule_without_copies() -> StepPlan:
        plan = schedule()
        plan.cow_copies.clear()
        eng.allocator.cow_log.clear()
        return plan

    eng.scheduler.schedule = schedule_without_copies
    with pytest.raises(AssertionError, match="reads wrong KV"):
        eng.drain()


def test_forked_choice_commits_after_an_eviction() -> None:
    """A bug this file found (edgert/core/scheduler.py, _fork + postprocess): a forked choice
    got its parent's prefix chain in schedule(), BEFORE postprocess committed the parent's new
    blocks, and postprocess never caught the choice's chain up. Here:

    - step 1: A = [2, 2] registers block (2, 2); P = [2, 2, 1, 2] (n = 2) computed its own copy
      of (2, 2) in the same step, so its commit reuses A's registration for block 0 and
      registers its own block 1 under it; P's choice has an empty chain. A finishes.
    - step 2: the pool is full (B holds the rest), so P's choice evicts A's (2, 2) for its next
      token; its commit re-walks the prefix from block 0, registers the shared block 0 under a
      new id, and then finds the shared block 1 "already cached under different tokens":
      postprocess raised ValueError and the engine step died.

    Now postprocess commits each choice right after its parent, and the step completes."""
    eng = FakeEngine(usable_blocks=8, block_size=2, max_num_seqs=4, max_model_len=16)
    eng.submit([1, 1, 1, 1, 1, 1], _ignore_eos(max_tokens=6))  # B
    eng.submit([2, 2], _ignore_eos(max_tokens=1))  # A
    eng.submit([2, 2, 1, 2], _ignore_eos(max_tokens=2, n=2))  # P
    eng.drain()
    assert eng.counts.reasons["length"] == 4


def _prefill_widths(prompt_len: int, *, prompts: int = 1) -> list[list[tuple[int, int, int]]]:
    """The prefill calls' padded (S, T) and their real tokens, step by step, of `prompts`
    fresh prompts of `prompt_len` tokens submitted together (256-token budget)."""
    eng = FakeEngine(usable_blocks=256, block_size=16, max_num_batched_tokens=256)
    eng.record_plans = True
    for i in range(prompts):
        eng.submit([1 + (i + j) % 7 for j in range(prompt_len)], _ignore_eos(max_tokens=2))
    eng.drain()
    return [[(c.shape[0], c.shape[1], sum(len(r.tokens) for r in c.rows))
             for c in plan.calls if not c.is_decode] for plan in eng.plans]


@pytest.mark.parametrize(("prompt_len", "widths"), [
    (141, [128, 16]),  # 128 + 13, not 141 padded to 256
    (250, [256]),  # 6 positions of padding beat a second call
    (129, [128]),  # the last prompt token decodes beside the others
    (100, [64, 32, 4]),
])
def test_a_prompt_is_cut_where_padding_its_chunk_would_cost_more(prompt_len: int,
                                                                 widths: list[int]) -> None:
    """A chunk's width is padded to a power of two. By the cost model's prices (160 a call, 12
    a padded position) a prompt just past a power of two runs that power now and the rest
    after, instead of paying for nearly twice its positions."""
    steps = [calls for calls in _prefill_widths(prompt_len) if calls]
    assert [t for calls in steps for _, t, _ in calls] == widths, steps
    assert sum(n for calls in steps for *_, n in calls) in (prompt_len, prompt_len - 1)


def test_prompts_arriving_together_fill_the_budget_with_real_tokens() -> None:
    """Sixteen 141-token prompts: their prefill calls carry 91% real tokens in all (one
    256-wide call per prompt, as before, carried 55%)."""
    steps = [calls for calls in _prefill_widths(141, prompts=16) if calls]
    padded = sum(s * t for calls in steps for s, t, _ in calls)
    real = sum(n for calls in steps for *_, n in calls)
    assert real >= 0.85 * padded, (real, padded, steps)
