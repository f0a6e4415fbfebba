"""KV pool and block allocator: real numpy, no mocks.

The allocator's correctness is mostly about invariants under arbitrary interleavings (sharing,
eviction, copy-on-write, prefix hits), so the core of this file is a hypothesis state machine that
also models what each physical block actually contains. That model is what lets the test say
"a prefix hit never serves a block whose content differs", instead of only checking bookkeeping
against itself.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgert.core.block_allocator import BlockAllocator, NoFreeBlocks, PoolUsage
from edgert.runner.kv_pool import KVPool

# --------------------------------------------------------------------------------------------------
# KVPool
# --------------------------------------------------------------------------------------------------


def _filled_pool(L: int = 3, kvh: int = 2, d: int = 4, bs: int = 4, nb: int = 10) -> KVPool:
    """A pool whose non-null blocks hold random sentinels, so "untouched" is observable."""
    pool = KVPool(L, kvh, d, bs, nb)
    rng = np.random.default_rng(1)
    pool.data[:, :, 1:] = rng.standard_normal(pool.data[:, :, 1:].shape).astype(np.float32)
    return pool


def _reference_write(ref: np.ndarray, new_kv: np.ndarray, slots: np.ndarray, bs: int) -> None:
    """The obvious, slow definition of `KVPool.write`, one token at a time."""
    L, _, S, T = new_kv.shape[:4]
    for layer in range(L):
        for kv in range(2):
            for s in range(S):
                for t in range(T):
                    slot = int(slots[s, t])
                    if slot >= 0:
                        ref[layer, kv, slot // bs, :, slot % bs] = new_kv[layer, kv, s, t]


@settings(max_examples=60, deadline=None)
@given(
    S=st.integers(1, 4),
    T=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    pad_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_write_matches_loop_reference(S: int, T: int, seed: int, pad_frac: float) -> None:
    bs, nb = 4, 10
    pool = _filled_pool(bs=bs, nb=nb)
    rng = np.random.default_rng(seed)
    slots = rng.choice(np.arange(bs, nb * bs), size=S * T, replace=False).reshape(S, T)
    slots[rng.random((S, T)) < pad_frac] = -1
    new_kv = rng.standard_normal((3, 2, S, T, 2, 4)).astype(np.float32)
    ref = pool.data.copy()
    _reference_write(ref, new_kv, slots, bs)
    pool.write(new_kv, slots.astype(np.int32))
    np.testing.assert_array_equal(pool.data, ref)
    assert not pool.data[:, :, 0].any(), "the null block must stay zero"


def test_write_is_visible_through_layer_views_and_views_are_zero_copy() -> None:
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=2, block_size=4, num_blocks=3)
    assert not pool.data.any()
    for layer in range(2):
        for view in (pool.key(layer), pool.value(layer)):
            assert view.shape == (3, 1, 4, 2)  # [num_blocks, kv_heads, block_size, head_dim]
            assert view.flags.c_contiguous
            assert np.shares_memory(view, pool.data)
    new_kv = np.arange(2 * 2 * 1 * 1 * 1 * 2, dtype=np.float32).reshape(2, 2, 1, 1, 1, 2) + 1
    pool.write(new_kv, np.array([[4 * 2 + 3]]))  # block 2, offset 3
    np.testing.assert_array_equal(pool.key(1)[2, :, 3], new_kv[1, 0, 0, 0])
    np.testing.assert_array_equal(pool.value(0)[2, :, 3], new_kv[0, 1, 0, 0])
    assert pool.nbytes == 2 * 2 * 3 * 4 * 1 * 2 * 4


def _mapping_of(a: np.ndarray) -> dict[str, int]:
    """The kB fields of the /proc/self/smaps entry holding `a`'s first byte."""
    addr = a.__array_interface__["data"][0]
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= addr < hi
            elif inside and line.rstrip().endswith("kB"):
                fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def test_pool_is_resident_from_the_start_and_in_small_pages() -> None:
    """The budget is claimed when the pool is made (no page fault inside a step, and RSS is what
    months of traffic will make it), and without transparent huge pages (compacting memory for
    them made claiming 10x slower here, for no measured step gain)."""
    pool = KVPool(4, 2, 64, 16, 1024, dtype=np.float16)  # 32 MiB
    m = _mapping_of(pool.data)
    assert m, "the pool's mapping was not found in /proc/self/smaps"
    assert m["Rss"] * 1024 >= pool.nbytes, m
    assert m.get("AnonHugePages", 0) == 0, m
    assert not pool.data.any() and pool.data.flags.writeable and pool.data.flags.c_contiguous


def test_write_rejects_bad_slots_and_shapes() -> None:
    pool = _filled_pool()
    before = pool.data.copy()
    kv = np.ones((3, 2, 1, 2, 2, 4), np.float32)
    for bad in ([[0, 5]], [[3, 5]], [[5, 40]], [[-2, 5]]):  # null block x2, past the end, < -1
        with pytest.raises(ValueError):
            pool.write(kv, np.array(bad))
    with pytest.raises(ValueError):
        pool.write(kv, np.array([[5]]))  # slot_mapping shape mismatch
    with pytest.raises(ValueError):
        pool.write(np.ones((3, 2, 1, 2, 2, 5), np.float32), np.array([[5, 6]]))
    with pytest.raises(TypeError):
        pool.write(kv, np.array([[5.0, 6.0]]))
    pool.write(kv, np.array([[-1, -1]]))  # all padding: a no-op
    np.testing.assert_array_equal(pool.data, before)


def test_copy_blocks_copies_every_layer_k_and_v_from_the_original_contents() -> None:
    pool = _filled_pool()
    orig = pool.data.copy()
    pool.copy_blocks([(1, 2), (2, 3), (5, 7)])  # (2, 3) must copy block 2 as it was before
    expected = orig.copy()
    expected[:, :, 2] = orig[:, :, 1]
    expected[:, :, 3] = orig[:, :, 2]
    expected[:, :, 7] = orig[:, :, 5]
    np.testing.assert_array_equal(pool.data, expected)
    pool.copy_blocks([])
    np.testing.assert_array_equal(pool.data, expected)
    for bad in ([(1, 0)], [(1, 10)], [(10, 1)], [(1, 2), (3, 2)]):
        with pytest.raises(ValueError):
            pool.copy_blocks(bad)


def test_num_blocks_for_budget_arithmetic() -> None:
    # SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64; fp32 block of 16 tokens = 737,280 bytes.
    per_block = 30 * 2 * 16 * 3 * 64 * 4
    assert KVPool.bytes_per_block(30, 3, 64, 16, np.float32) == per_block == 737_280
    assert KVPool.num_blocks_for_budget(2000 * per_block, 30, 3, 64, 16, np.float32) == 2000
    assert KVPool.num_blocks_for_budget(2001 * per_block - 1, 30, 3, 64, 16, np.float32) == 2000
    assert KVPool.num_blocks_for_budget(2000 * per_block, 30, 3, 64, 16, np.float16) == 4000
    assert KVPool.num_blocks_for_budget(2 * per_block, 30, 3, 64, 16, "float32") == 2
    with pytest.raises(ValueError, match="null block"):
        KVPool.num_blocks_for_budget(2 * per_block - 1, 30, 3, 64, 16, np.float32)
    with pytest.raises(ValueError, match="at least 2"):
        KVPool.num_blocks_for_budget(0, 30, 3, 64, 16, np.float32)
    pool = KVPool(2, 1, 8, 4, KVPool.num_blocks_for_budget(10_000, 2, 1, 8, 4, np.float32))
    assert pool.nbytes <= 10_000
    assert pool.nbytes + KVPool.bytes_per_block(2, 1, 8, 4, np.float32) > 10_000


# --------------------------------------------------------------------------------------------------
# BlockAllocator: targeted scenarios
# --------------------------------------------------------------------------------------------------

BS = 4


def _acquire(alloc: BlockAllocator, seq_id: int, prompt: list[int]) -> int:
    """Admit a sequence with only its cached prefix; returns the prefix hit in tokens."""
    prefix = alloc.match_prefix(prompt)
    assert alloc.admit(seq_id, prefix, len(prefix) * alloc.block_size, looked_up=len(prompt))
    return len(prefix) * alloc.block_size


def _prefill(alloc: BlockAllocator, seq_id: int, prompt: list[int]) -> int:
    """What the scheduler does for a new prompt; returns the prefix hit."""
    hit = _acquire(alloc, seq_id, prompt)
    assert alloc.ensure_capacity(seq_id, len(prompt))
    alloc.commit(seq_id, prompt)
    return hit


def test_shared_prompt_is_served_from_cache_and_capped_to_leave_a_token() -> None:
    alloc = BlockAllocator(num_blocks=32, block_size=BS)
    prompt = list(range(100, 140))  # exactly 10 full blocks
    assert _prefill(alloc, 1, prompt) == 0
    a = alloc.block_table(1)
    assert len(a) == 10 and 0 not in a

    # Whole prompt cached, but the last token must be recomputed to get logits: 9 blocks, not 10.
    assert _acquire(alloc, 2, prompt) == 9 * BS
    b = alloc.block_table(2)
    assert b == a[:9]
    refs = alloc.debug_state().refcounts
    assert all(refs[x] == 2 for x in a[:9]) and refs[a[9]] == 1
    assert alloc.ensure_capacity(2, len(prompt))
    b = alloc.block_table(2)
    assert b[9] != a[9] and alloc.cow_for_write(2, 39) is None
    alloc.commit(2, prompt)  # block 10's prefix already cached from seq 1: that mapping is kept
    cached_blocks = {c.block for c in alloc.debug_state().cached}
    assert a[9] in cached_blocks and b[9] not in cached_blocks
    assert alloc.usage().used == 11

    alloc.free(1)
    alloc.free(2)
    u = alloc.usage()
    assert (u.used, u.cached, u.free) == (0, 10, 31 - 10)
    # A longer prompt with the same 10 leading blocks reuses all of them.
    assert _acquire(alloc, 3, prompt + [7]) == 10 * BS
    assert alloc.block_table(3) == a
    assert alloc.usage().cached == 0
    s = alloc.stats
    assert s.prefix_queries_tokens == 40 + 40 + 41 and s.prefix_hit_tokens == 36 + 40
    assert s.prefix_hit_rate == pytest.approx(76 / 121)


@pytest.mark.parametrize(
    ("length", "expected_hit"),
    [(1, 0), (4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)],
)
def test_prefix_hit_always_leaves_at_least_one_token(length: int, expected_hit: int) -> None:
    alloc = BlockAllocator(num_blocks=16, block_size=BS)
    tokens = list(range(1, 20))
    _prefill(alloc, 1, tokens[:16])
    alloc.free(1)
    hit = _acquire(alloc, 2, tokens[:length])
    assert hit == expected_hit
    assert hit < length


def test_lru_evicts_the_oldest_prefix_tail_first() -> None:
    alloc = BlockAllocator(num_blocks=9, block_size=BS)  # 8 usable
    p1, p2 = [1] * 12, [2] * 12  # 3 blocks each
    _prefill(alloc, 1, p1)
    _prefill(alloc, 2, p2)
    t1, t2 = alloc.block_table(1), alloc.block_table(2)
    alloc.free(1)  # p1 is now the least recently used prefix
    alloc.free(2)
    assert alloc.debug_state().lru == tuple(reversed(t1)) + tuple(reversed(t2))
    assert alloc.usage().free == 2 and alloc.num_free_blocks == 8

    assert _acquire(alloc, 3, [3] * 12) == 0
    assert alloc.ensure_capacity(3, 12)  # 2 free blocks, then evicts p1's LAST block
    assert alloc.stats.evictions == 1
    assert t1[2] in alloc.block_table(3)
    alloc.free(3)
    # p1 lost only its tail: its first two blocks still hit.
    assert _acquire(alloc, 4, p1 + [9]) == 8
    assert alloc.block_table(4) == t1[:2]
    assert _acquire(alloc, 5, p2 + [9]) == 12
    alloc.free(4)
    alloc.free(5)
    assert alloc.usage().used == 0


def test_ensure_capacity_failure_changes_nothing() -> None:
    alloc = BlockAllocator(num_blocks=5, block_size=BS)  # 4 usable
    _prefill(alloc, 1, [1] * 8)
    _acquire(alloc, 2, [2])
    before = alloc.debug_state()
    assert not alloc.ensure_capacity(2, 3 * BS)
    assert alloc.debug_state() == before
    assert alloc.ensure_capacity(2, 2 * BS)
    assert alloc.ensure_capacity(2, 2 * BS)  # already enough: no-op
    assert alloc.usage().free == 0
    assert not alloc.ensure_capacity(2, 2 * BS + 1)


def test_fork_and_copy_on_write() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=BS)
    _prefill(alloc, 1, [5, 6, 7, 8, 9, 10])  # one full block, one partial
    alloc.fork(1, 2)
    t = alloc.block_table(1)
    assert alloc.block_table(2) == t
    assert all(alloc.debug_state().refcounts[b] == 2 for b in t)
    assert alloc.needs_cow(2, 6) and alloc.can_cow(2, 6)
    old, new = alloc.cow_for_write(2, 6)  # type: ignore[misc]
    assert old == t[1] and new not in t
    assert alloc.block_table(2) == [t[0], new]
    refs = alloc.debug_state().refcounts
    assert refs[t[0]] == 2 and refs[t[1]] == 1 and refs[new] == 1
    assert alloc.cow_for_write(2, 7) is None  # already private
    assert alloc.cow_for_write(1, 6) is None  # the parent is the sole owner now


def test_cow_without_a_free_block_raises_and_changes_nothing() -> None:
    alloc = BlockAllocator(num_blocks=3, block_size=BS)  # 2 usable
    _prefill(alloc, 1, [1, 2, 3, 4, 5])
    alloc.fork(1, 2)
    assert not alloc.can_cow(2, 5)
    before = alloc.debug_state()
    with pytest.raises(NoFreeBlocks):
        alloc.cow_for_write(2, 5)
    assert alloc.debug_state() == before
    with pytest.raises(ValueError, match="ensure_capacity"):
        alloc.cow_for_write(2, 8)


def test_commit_is_incremental_and_idempotent() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=BS)
    toks = list(range(1, 14))
    _acquire(alloc, 1, toks)
    assert alloc.ensure_capacity(1, len(toks))
    alloc.commit(1, toks[:3])
    assert alloc.debug_state().cached == ()
    alloc.commit(1, toks[:9])
    s1 = alloc.debug_state()
    assert len(s1.cached) == 2 and len(s1.prefix_chains[1]) == 2
    alloc.commit(1, toks[:9])
    alloc.commit(1, toks[:5])  # fewer tokens than already committed: nothing to do
    assert alloc.debug_state() == s1
    alloc.commit(1, toks)
    assert len(alloc.debug_state().cached) == 3


def test_hash_collisions_never_share_kv() -> None:
    # Python hashes ints modulo 2**61 - 1, so these two blocks have identical tuple hashes.
    m = 2**61 - 1
    a, b = [1, 2, 3, 4, 9], [1 + m, 2, 3, 4, 9]
    assert hash(tuple(a[:4])) == hash(tuple(b[:4]))
    alloc = BlockAllocator(num_blocks=8, block_size=BS)
    _prefill(alloc, 1, a)
    assert _acquire(alloc, 2, b) == 0
    assert _acquire(alloc, 3, a) == 4


def test_rewriting_a_committed_position_forgets_its_hashes() -> None:
    """A rollback/recompute must not leave the cache describing overwritten content."""
    alloc = BlockAllocator(num_blocks=8, block_size=BS)
    toks = list(range(1, 13))  # 3 full blocks
    _prefill(alloc, 1, toks)
    assert len(alloc.debug_state().cached) == 3
    assert alloc.cow_for_write(1, 5) is None  # rewrite inside block 1: blocks 1 and 2 go
    s = alloc.debug_state()
    assert len(s.prefix_chains[1]) == 1 and [c.block for c in s.cached] == [alloc.block_table(1)[0]]
    new = toks[:5] + [99] * 7
    alloc.commit(1, new)
    alloc.free(1)
    assert _acquire(alloc, 2, toks + [0]) == 4
    assert _acquire(alloc, 3, new + [0]) == 12


def test_prefix_caching_disabled() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    _prefill(alloc, 1, [1] * 12)
    assert _acquire(alloc, 2, [1] * 12) == 0
    alloc.free(1)
    alloc.free(2)
    assert alloc.usage() == PoolUsage(total=7, used=0, cached=0, free=7)


def test_misuse_is_reported() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=BS)
    _acquire(alloc, 1, [1])
    with pytest.raises(ValueError):
        alloc.admit(1, [], 1)
    with pytest.raises(ValueError):
        alloc.fork(1, 1)  # the child already exists
    with pytest.raises(KeyError):
        alloc.fork(7, 2)
    with pytest.raises(KeyError):
        alloc.free(7)
    assert not alloc.has(2) and alloc.has(1)
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=1, block_size=BS)
    assert (
        alloc.blocks_needed(0) == 0 and alloc.blocks_needed(4) == 1 and alloc.blocks_needed(5) == 2
    )


# --------------------------------------------------------------------------------------------------
# BlockAllocator: stateful model
# --------------------------------------------------------------------------------------------------

NUM_BLOCKS = 24
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=40)  # small alphabet: prefixes repeat


class AllocatorMachine(RuleBasedStateMachine):
    """Drives a BlockAllocator like a scheduler would, while modelling the pool's contents.

    `content[block][offset]` is the token prefix whose KV a slot holds (KV at position p depends on
    tokens[0..p]); it is updated exactly where the runtime would write or copy KV, and is never
    cleared on free, like real memory. `tokens[seq]` are the tokens whose KV is in the pool.
    """

    @initialize()
    def setup(self) -> None:
        self.alloc = BlockAllocator(NUM_BLOCKS, BS)
        self.tokens: dict[int, list[int]] = {}
        self.content: dict[int, list[tuple[int, ...] | None]] = {
            b: [None] * BS for b in range(NUM_BLOCKS)
        }
        self.prefix_of_id: dict[int, tuple[int, ...]] = {}
        self.history: list[list[int]] = []
        self.next_id = 0

    # -- helpers --

    def _write(self, seq_id: int, tok: int) -> None:
        toks = self.tokens[seq_id]
        pos = len(toks)
        block = self.alloc.block_table(seq_id)[pos // BS]
        assert block != 0
        toks.append(tok)
        self.content[block][pos % BS] = tuple(toks)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # -- rules --

    @rule(data=st.data(), fresh=prompts, chunk=st.integers(1, 16))
    def add_sequence(self, data: st.DataObject, fresh: list[int], chunk: int) -> None:
        prompt = fresh
        if self.history and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.history))
            cut = data.draw(st.integers(0, len(base)))
            prompt = (base[:cut] + fresh)[:40]
        self.history.append(prompt)
        sid = self._new_id()
        before = self.alloc.debug_state()
        prefix = self.alloc.match_prefix(prompt)  # a lookup: takes nothing
        assert self.alloc.debug_state() == before
        hit = len(prefix) * BS
        assert hit <= (len(prompt) - 1) // BS * BS
        if hit:
            event("prefix hit")
        for i, block in enumerate(prefix):  # the property that matters: hits serve correct KV
            want = [tuple(prompt[: i * BS + o + 1]) for o in range(BS)]
            assert self.content[block] == want, f"prefix hit on block {block} with wrong KV"
        can = self.alloc.can_admit(prefix, len(prompt))
        if not self.alloc.admit(sid, prefix, len(prompt), looked_up=len(prompt)):
            assert not can and self.alloc.debug_state() == before  # all or nothing
            event("admission refused")
            return
        assert can and self.alloc.block_table(sid)[: len(prefix)] == prefix
        self.tokens[sid] = list(prompt[:hit])
        for start in range(hit, len(prompt), chunk):  # chunked prefill, committing each chunk
            for pos in range(start, min(start + chunk, len(prompt))):
                assert self.alloc.cow_for_write(sid, pos) is None
                self._write(sid, prompt[pos])
            self.alloc.commit(sid, self.tokens[sid])

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data: st.DataObject, new: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        before = self.alloc.debug_state()
        if not self.alloc.ensure_capacity(sid, len(self.tokens[sid]) + len(new)):
            assert self.alloc.debug_state() == before
            return
        for tok in new:
            pos = len(self.tokens[sid])
            if not self.alloc.can_cow(sid, pos):
                before = self.alloc.debug_state()
                with pytest.raises(NoFreeBlocks):
                    self.alloc.cow_for_write(sid, pos)
                assert self.alloc.debug_state() == before
                event("copy-on-write refused")
                break
            cow = self.alloc.cow_for_write(sid, pos)
            if cow is not None:
                old, new_block = cow
                assert old != new_block and 0 not in cow
                event("copy-on-write")
                self.content[new_block] = list(self.content[old])  # KVPool.copy_blocks
            self._write(sid, tok)
        if data.draw(st.booleans()):
            self.alloc.commit(sid, self.tokens[sid])

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.commit(sid, self.tokens[sid])
        after = self.alloc.debug_state()
        self.alloc.commit(sid, self.tokens[sid])
        assert self.alloc.debug_state() == after  # idempotent

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.alloc.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.free(sid)
        del self.tokens[sid]
        assert not self.alloc.has(sid)

    @rule()
    def free_all(self) -> None:
        for sid in list(self.tokens):
            self.alloc.free(sid)
        self.tokens.clear()
        u = self.alloc.usage()
        assert u.used == 0 and u.cached + u.free == u.total

    # -- invariants --

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        s = self.alloc.debug_state()
        u = self.alloc.usage()
        assert set(s.tables) == set(self.tokens)
        refs = Counter(b for t in s.tables.values() for b in t)
        assert 0 not in refs and s.refcounts[0] == 0
        assert all(s.refcounts[b] == refs.get(b, 0) for b in range(NUM_BLOCKS))
        free, lru = set(s.free), set(s.lru)
        used = {b for b in range(1, NUM_BLOCKS) if s.refcounts[b] > 0}
        assert len(free) == len(s.free) and len(lru) == len(s.lru)
        assert not (free & lru) and not (free & used) and not (lru & used)
        assert free | lru | used == set(range(1, NUM_BLOCKS))
        assert (u.total, u.used, u.cached, u.free) == (
            NUM_BLOCKS - 1,
            len(used),
            len(lru),
            len(free),
        )
        assert u.used + u.cached + u.free == u.total
        assert self.alloc.num_free_blocks == len(free) + len(lru)
        registered = {c.block for c in s.cached}
        assert lru <= registered and not (free & registered)
        for sid, toks in self.tokens.items():
            assert len(s.tables[sid]) >= self.alloc.blocks_needed(len(toks))

    @invariant()
    def cache_describes_real_content(self) -> None:
        s = self.alloc.debug_state()
        # Each prefix id must always denote the same token prefix, wherever it is seen.
        for sid, chain in s.prefix_chains.items():
            toks = self.tokens[sid]
            assert len(chain) <= len(toks) // BS
            for i, pid in enumerate(chain):
                want = tuple(toks[: (i + 1) * BS])
                assert self.prefix_of_id.setdefault(pid, want) == want
        keys = set()
        for c in s.cached:
            prefix = self.prefix_of_id[c.prefix_id]
            assert c.tokens == prefix[-BS:] and len(c.tokens) == BS
            if c.parent_prefix_id == 0:
                assert len(prefix) == BS
            else:
                assert self.prefix_of_id[c.parent_prefix_id] + c.tokens == prefix
            want = [prefix[: len(prefix) - BS + o + 1] for o in range(BS)]
            assert self.content[c.block] == want, f"cached block {c.block} holds other KV"
            keys.add((c.parent_prefix_id, c.tokens))
        assert len(keys) == len(s.cached)

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        if self.alloc.stats.evictions:
            event("eviction")
        for sid in list(self.tokens):
            self.alloc.free(sid)
        u = self.alloc.usage()
        assert u.used == 0 and u.cached + u.free == u.total


AllocatorMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_allocator_state_machine = AllocatorMachine.TestCase
