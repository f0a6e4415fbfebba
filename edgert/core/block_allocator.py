"""Who owns which KV block: block tables, reference counts and the prefix cache, as pure
bookkeeping (no tensors). The memory itself belongs to the backend (runner/), so the scheduler
can plan a step (admission, preemption, copy-on-write) without touching it, and this can be
tested exhaustively without allocating a pool.

Admission is two-phase: `match_prefix` looks up the cached prefix of a prompt WITHOUT taking
references, and `admit` takes the prefix references and the new blocks together, all or
nothing. A sequence that waits therefore never owns a block, which is what keeps a small pool
under a shared system prompt from deadlocking (issue 8).

Block 0 is the reserved null block (see DESIGN.md, "The paged-KV calling convention"): block tables
are padded with 0, so block 0 must stay all-zero forever. It is never allocated, freed, cached,
written or placed in a table.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AllocatorState",
    "AllocatorStats",
    "BlockAllocator",
    "CachedBlock",
    "NoFreeBlocks",
    "PoolUsage",
]

NULL_BLOCK = 0


class NoFreeBlocks(RuntimeError):
    """Raised when a block is needed right now and none can be had.

    Only `cow_for_write` raises it: the scheduler is expected to check capacity first, so reaching
    this is a scheduling bug rather than a normal out-of-memory condition.
    """


@dataclass(frozen=True)
class PoolUsage:
    """A snapshot of how the pool's usable blocks are split; `used + cached + free == total`."""

    total: int  # usable blocks (num_blocks - 1; block 0 is the reserved null block)
    used: int  # blocks referenced by at least one sequence
    cached: int  # unreferenced blocks that still hold a reusable prefix (evictable, LRU)
    free: int  # unreferenced, holding nothing reusable


# Prefix identity of "nothing before this block"; real prefix ids start at 1.
_ROOT_PREFIX = 0

# A cache key: (prefix id of everything before the block, the block's own tokens).
_CacheKey = tuple[int, tuple[int, ...]]


class _Registration(NamedTuple):
    key: _CacheKey
    prefix_id: int  # identity of the whole token prefix ending with this block


@dataclass
class AllocatorStats:
    """Counters for metrics; prefix_hit_tokens / prefix_queries_tokens is the prefix hit rate."""

    prefix_queries_tokens: int = 0
    prefix_hit_tokens: int = 0
    evictions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )


@dataclass(frozen=True)
class CachedBlock:
    """One prefix-cache registration, as exposed by `BlockAllocator.debug_state`."""

    block: int
    parent_prefix_id: int  # 0 for a block that starts the sequence
    tokens: tuple[int, ...]
    prefix_id: int


@dataclass(frozen=True)
class AllocatorState:
    """A copy of the allocator's internals, for invariant checks in tests and for diagnostics."""

    refcounts: tuple[int, ...]
    free: tuple[int, ...]
    lru: tuple[int, ...]  # least recently used first
    tables: dict[int, tuple[int, ...]]
    prefix_chains: dict[int, tuple[int, ...]]  # per sequence: prefix id of each hashed block
    cached: tuple[CachedBlock, ...]


class BlockAllocator:
    """Bookkeeping only (no tensors): which sequence owns which blocks, refcounts, prefix cache.

    Every operation is O(1) per block touched (free stack, OrderedDict LRU, dicts), so it stays
    negligible next to the graph call even with thousands of blocks.

    Prefix cache and collisions. A full block's KV depends on every token before it, so a block is
    cached under the key (identity of the preceding prefix, tuple of its own tokens). Rather than a
    chained hash, the identity of a prefix is a unique integer handed out when a block is first
    registered (0 = empty prefix). The key is looked up in a dict, and a dict compares keys by
    equality after the hash, so two different token tuples whose Python hashes collide can never
    match (the "store the tokens and compare on hit" rule). A chained hash would still be exposed
    at the parent link: a collision between two different prefixes' chain hashes would let one
    prefix's children be served for the other. Ids are never reused, so equal ids mean equal
    prefixes, and a lookup hit is exact. When a block is evicted its id dies with it; children
    registered under that id become unreachable and are evicted in LRU order (a lost hit, never a
    wrong one).
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = AllocatorStats()
        self._refcount: list[int] = [0] * num_blocks
        # A stack popped from the end; reversed so low block ids go first, which only makes
        # traces easier to read.
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        # refcount-0 blocks that are registered in the cache; oldest first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._cache: dict[_CacheKey, int] = {}
        self._registered: dict[int, _Registration] = {}
        self._tables: dict[int, list[int]] = {}
        # Per sequence, the prefix id of each of its leading full blocks already hashed; its
        # length is how far `commit` has got, which makes `commit` incremental.
        self._chains: dict[int, list[int]] = {}
        self._next_prefix_id = itertools.count(_ROOT_PREFIX + 1)

    # ---- queries -------------------------------------------------------------------------------

    def usage(self) -> PoolUsage:
        total = self.num_blocks - 1
        free = len(self._free)
        cached = len(self._lru)
        return PoolUsage(total=total, used=total - free - cached, cached=cached, free=free)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: truly free ones plus evictable cached ones."""
        return len(self._free) + len(self._lru)

    def blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's table, so callers cannot corrupt the refcount bookkeeping."""
        return list(self._table(seq_id))

    def needs_cow(self, seq_id: int, position: int) -> bool:
        """Whether writing `position` needs a fresh block (its block is shared)."""
        return self._refcount[self._block_at(seq_id, position)] > 1

    def can_cow(self, seq_id: int, position: int) -> bool:
        """Whether cow_for_write(seq_id, position) will succeed: the scheduler checks first."""
        return not self.needs_cow(seq_id, position) or self.num_free_blocks > 0

    # ---- sequence lifecycle ----------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest run of leading full blocks of `token_ids`,
        looked up WITHOUT taking references (the sequence may still have to wait).

        Capped at (len - 1) // block_size blocks so at least the last prompt token is computed:
        the graph only yields logits for tokens it processes, and sampling needs them."""
        blocks: list[int] = []
        n = len(token_ids)
        if not self.enable_prefix_caching or n < 2:
            return blocks
        bs = self.block_size
        parent = _ROOT_PREFIX
        for i in range((n - 1) // bs):
            block = self._cache.get((parent, tuple(token_ids[i * bs: (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._registered[block].prefix_id
        return blocks

    def can_admit(self, prefix: Sequence[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `admit(.., prefix, num_tokens)` would succeed and leave `reserve` blocks
        obtainable afterwards. Cached prefix blocks that nobody holds sit in the LRU and count
        as obtainable, so taking them costs free capacity too."""
        need = max(self.blocks_needed(num_tokens) - len(prefix), 0)
        idle_prefix = sum(1 for b in prefix if self._refcount[b] == 0)
        return need + idle_prefix + reserve <= self.num_free_blocks

    def admit(self, seq_id: int, prefix: Sequence[int], num_tokens: int,
              looked_up: int = 0) -> bool:
        """Create seq_id's table: references on the cached `prefix` (from `match_prefix`) plus
        fresh blocks up to `num_tokens` slots. All or nothing: False changes nothing.

        `looked_up` is how many tokens the prefix lookup covered: the hit-rate metrics count
        it here, once per admission, never for a sequence that keeps waiting."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if not self.can_admit(prefix, num_tokens):
            return False
        table: list[int] = []
        chain: list[int] = []
        for block in prefix:
            if self._refcount[block] == 0:
                del self._lru[block]
            self._refcount[block] += 1
            table.append(block)
            chain.append(self._registered[block].prefix_id)
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take_block())
        self._tables[seq_id] = table
        self._chains[seq_id] = chain
        self.stats.prefix_queries_tokens += looked_up
        self.stats.prefix_hit_tokens += len(prefix) * self.block_size
        return True

    def ensure_capacity(self, seq_id: int, num_tokens: int) -> bool:
        """Grow seq_id's table to hold num_tokens slots; all or nothing.

        All-or-nothing so the scheduler can simply try and, on False, leave the request waiting
        or preempt someone, without having to undo a half-grown table.
        """
        table = self._table(seq_id)
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            table.append(self._take_block())
        return True

    def cow_for_write(self, seq_id: int, position: int) -> tuple[int, int] | None:
        """Make the block holding `position` private to seq_id before it is written.

        Returns (old, new) when the caller must copy old's content into new (KVPool.copy_blocks),
        else None. Writing into a block that is already hashed (a recompute or rollback of a
        committed position) also forgets that hash for this sequence, and un-registers the block
        if no one else can see it, so the cache never describes content that has changed.
        """
        table = self._table(seq_id)
        idx = self._block_index(seq_id, position)
        old = table[idx]
        chain = self._chains[seq_id]
        if self._refcount[old] > 1:
            if self.num_free_blocks == 0:
                raise NoFreeBlocks(
                    f"copy-on-write for sequence {seq_id} at position {position} needs a block and "
                    "none is free or evictable (check can_cow / num_free_blocks first)"
                )
            new = self._take_block()
            self._refcount[old] -= 1  # still >= 1: someone else holds it, so it stays "used"
            table[idx] = new
            self._forget_hashes_from(table, chain, idx)
            return old, new
        self._forget_hashes_from(table, chain, idx)
        return None

    def commit(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Register every newly completed full block of seq_id so later requests can reuse it.

        `token_ids` is every token whose KV is now in the pool for the sequence. Incremental: only
        blocks past the last committed one are hashed. When an equal prefix is already cached
        from another sequence the existing registration is kept and this sequence keeps its own
        block (which is then simply freed, not cached, when it ends).
        """
        table = self._table(seq_id)
        if not self.enable_prefix_caching:
            return
        chain = self._chains[seq_id]
        bs = self.block_size
        full = min(len(token_ids) // bs, len(table))
        for i in range(len(chain), full):
            parent = chain[-1] if chain else _ROOT_PREFIX
            key: _CacheKey = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            existing = self._cache.get(key)
            if existing is not None:
                chain.append(self._registered[existing].prefix_id)
                continue
            block = table[i]
            if block in self._registered:
                # Only reachable if the caller's tokens disagree with what it committed (or
                # forked from) before; registering would alias two different prefixes.
                raise ValueError(
                    f"commit for sequence {seq_id}: block {block} at index {i} is already cached "
                    "under different tokens; token_ids must be the tokens whose KV is in the pool"
                )
            prefix_id = next(self._next_prefix_id)
            self._cache[key] = block
            self._registered[block] = _Registration(key, prefix_id)
            chain.append(prefix_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give child_id the parent's blocks by reference (e.g. n > 1 samples of one prompt)."""
        table = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        for block in table:
            self._refcount[block] += 1
        self._tables[child_id] = list(table)
        self._chains[child_id] = list(self._chains[parent_id])

    def free(self, seq_id: int) -> None:
        """Release seq_id's blocks; hashed ones stay cached (evictable) for future prefix hits.

        Released tail-first so that, in the LRU, a prefix's later blocks are older than its earlier
        ones: eviction then trims prefixes from the end and never strands a cached tail behind an
        evicted head (which lookups could no longer reach).
        """
        table = self._table(seq_id)
        for block in reversed(table):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if block in self._registered:
                    self._lru[block] = None
                else:
                    self._free.append(block)
        del self._tables[seq_id]
        del self._chains[seq_id]

    def debug_state(self) -> AllocatorState:
        """A snapshot of the internals, so tests can check invariants without reaching into them."""
        return AllocatorState(
            refcounts=tuple(self._refcount),
            free=tuple(self._free),
            lru=tuple(self._lru),
            tables={s: tuple(t) for s, t in self._tables.items()},
            prefix_chains={s: tuple(c) for s, c in self._chains.items()},
            cached=tuple(
                CachedBlock(
                    block=b, parent_prefix_id=r.key[0], tokens=r.key[1], prefix_id=r.prefix_id
                )
                for b, r in self._registered.items()
            ),
        )

    # ---- internals -------------------------------------------------------------------------------

    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id}") from None

    def _block_index(self, seq_id: int, position: int) -> int:
        idx = position // self.block_size
        n = len(self._table(seq_id))
        if position < 0 or idx >= n:
            raise ValueError(
                f"position {position} of sequence {seq_id} is outside its {n} block(s); "
                "call ensure_capacity first"
            )
        return idx

    def _block_at(self, seq_id: int, position: int) -> int:
        return self._tables[seq_id][self._block_index(seq_id, position)]

    def _forget_hashes_from(self, table: list[int], chain: list[int], idx: int) -> None:
        """Drop the sequence's hashes from block idx on, because their content is being rewritten.

        Every later block's KV depends on block idx, so all of them go. Blocks only this sequence
        holds are un-registered too; shared ones keep their (still correct) registration, and
        writing to them will copy first.
        """
        for j in range(idx, len(chain)):
            if self._refcount[table[j]] == 1:
                self._unregister(table[j])
        del chain[idx:]

    def _take_block(self) -> int:
        """One block with refcount 1: a free one if any, else the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._lru.popitem(last=False)
            self._unregister(block)
            self.stats.evictions += 1
        self._refcount[block] = 1
        return block

    def _unregister(self, block: int) -> None:
        reg = self._registered.pop(block, None)
        if reg is not None:
            del self._cache[reg.key]
