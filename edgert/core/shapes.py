"""The finite menu of graph-call shapes (S, T, B): sequences, new tokens each, block-table width.

The scheduler only forms calls whose padded shape is on the menu, and warm-up runs every shape on
it, so after warm-up no new shape ever reaches a backend: ONNX Runtime's arena stops growing, and
a GPU backend can capture one graph per shape. The menu is kept small where a shape is expensive
to warm (long prefill chunks over long pasts) and fine where padding would cost the most (decode
batches, which run every step).

- decode (T = 1): S and B on the 1.5x ladder (1, 2, 3, 4, 6, 8, 12, ...), except that calls of
  up to four rows pad tables longer than 32 blocks on a 1.25x ladder (40, 48, 56, 64, 80,
  ...: `span_bucket`), where the gather over padding costs the most; with the padded work
  S x B bounded by what the pool can hold (twice its blocks), so one long sequence never pads
  fifteen short ones: the scheduler splits such a batch by length instead. Where the backend
  gives a lone row other bits than the same row beside another (a kernel's one-row path; the
  engine probes this at start), `pad_lone_decode`: no decode call has one row, and a lone
  decoding row takes a padding token, a (1, 2, B) prefill shape, rather than answer
  differently from a batched one.
- prefill: S and T powers of two with S x T within the token budget. Several sequences share a
  call only over short spans (fresh prompts), padded to one width; one sequence has B on the
  1.5x ladder, and over a long past a shorter chunk, its attention work T x B bounded. One
  sequence may always take two tokens, over any past.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

Shape = tuple[int, int, int]  # (S, T, B)


def bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3*2^(k-1)) that is >= n: at most
    1.5x padding, two values per octave."""
    if n <= 2:
        return max(n, 1)
    p = 1 << (n - 1).bit_length()
    three = 3 * p // 4
    return three if three >= n else p


# Decode tables longer than FINE_SPAN blocks pad to a quarter octave, not a half, in calls of up
# to FINE_ROWS rows: a long row's step is mostly the gather and attention over its padded table,
# every step. Measured on SmolLM2 int8 (Zen 4, one row, distinct blocks of 16): 35 ms over
# 257-320 blocks, 45 ms over 384, the bucket a 4,100-token context took on the 1.5x ladder. Wider
# calls keep the 1.5x ladder: the pool bounds their tables anyway, and every added shape is warmed
# at start (a 16k-token pool: 270 -> 294 shapes, 19.2 -> 20.9 s; for every row count, 308 and
# 23.6 s). 32 blocks: past 1,024 tokens in the default blocks of 32, where 64 blocks of 16 were.
FINE_SPAN = 32
FINE_ROWS = 4


def span_bucket(n: int) -> int:
    """A decode call's table width: bucket(n) up to FINE_SPAN blocks, then the smallest of
    2^k * (1, 1.25, 1.5, 1.75) that is >= n: at most 1.25x padding, four values per octave."""
    if n <= FINE_SPAN:
        return bucket(n)
    quarter = 1 << ((n - 1).bit_length() - 3)  # an eighth of the next power of two
    return -(-n // quarter) * quarter


def pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True)
class ShapeMenu:
    max_num_seqs: int  # sequences in one call (the running batch)
    token_budget: int  # new tokens per prefill call, padded (max_num_batched_tokens)
    max_blocks: int  # the longest block table a sequence can have (model length or pool)
    pool_blocks: int  # usable blocks in the pool
    block_size: int
    split_decode: bool = True  # False: one decode call per step, padded to the longest row
    pad_lone_decode: bool = False  # a lone decoding row takes T = 2 (module docstring)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "token_budget", "max_blocks", "pool_blocks", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    # ---- the ladders ----------------------------------------------------------------------
    @cached_property
    def t_max(self) -> int:
        """The widest prefill chunk: the largest power of two within the token budget."""
        return max(2, floor_pow2(self.token_budget))

    @cached_property
    def attention_work(self) -> int:
        """Bound on T x B (queries x key blocks) of a one-sequence prefill call: four times
        that of the widest chunk of a fresh prompt (a full chunk over up to 4x its own length
        of past), so a chunk over a longer past gets fewer tokens instead of warm-up having to
        run every long chunk over every long past. Measured on SmolLM2, 256-token budget: with
        2x a 5,000-token prompt took 1.5x as long to its first token as with 4x; 8x saved
        another 4% of that for 3 s more warm-up (README)."""
        return 4 * self.t_max * pow2(-(-self.t_max // self.block_size))

    @cached_property
    def decode_work(self) -> int:
        """Bound on the padded S x B of a decode call: the pool can never hold more than its
        blocks, so padding beyond twice that is pure waste; a single full-length row always
        fits. Without split decode calls, everything up to the widest batch."""
        widest = bucket(self.max_num_seqs) * bucket(self.max_blocks)
        if not self.split_decode:
            return widest
        return max(bucket(self.max_blocks), min(widest, 2 * bucket(self.pool_blocks)))

    def span(self, start: int, tokens: int) -> int:
        """Blocks a row's table must cover: its past and this call's (padded) tokens."""
        return -(-(start + tokens) // self.block_size)

    # ---- shapes of calls ------------------------------------------------------------------
    def decode_shape(self, rows: int, span: int) -> Shape:
        s = bucket(rows)
        return s, 1, span_bucket(span) if s <= FINE_ROWS else bucket(span)

    def prefill_shape(self, rows: int, tokens: int, span: int) -> Shape:
        s, t = pow2(rows), pow2(max(tokens, 2))
        return s, t, bucket(span) if s == 1 else max(self.multi_span // s, pow2(span))

    def decode_ok(self, shape: Shape) -> bool:
        s, t, b = shape
        return (t == 1 and 1 + self.pad_lone_decode <= s <= bucket(self.max_num_seqs)
                and b <= bucket(self.max_blocks) and s * b <= self.decode_work)

    def prefill_ok(self, shape: Shape) -> bool:
        s, t, b = shape
        if not (2 <= t <= self.t_max and s <= pow2(self.max_num_seqs) and s * t <= self.t_max
                and b * self.block_size >= t):
            return False
        if s > 1:  # several sequences share a call only over short pasts (fresh prompts),
            return b == self.multi_span // s  # padded to one width: few shapes to warm
        return (b == bucket(b) and b <= bucket(self.max_blocks)
                and (t * b <= self.attention_work or t == 2))

    @cached_property
    def multi_span(self) -> int:
        """S x B of a prefill call of several sequences: twice the blocks of one widest chunk.
        Continuations of long prompts and suffixes after a long cached prefix run one sequence
        per call (any number of such calls per step)."""
        return 2 * pow2(-(-self.t_max // self.block_size))

    def chunk_limit(self, start: int) -> int:
        """The longest prefill chunk (a power of two) a row starting at `start` may take alone,
        so that its call stays on the menu."""
        t = self.t_max
        while t > 2 and not self.prefill_ok(self.prefill_shape(1, t, self.span(start, t))):
            t //= 2
        return t

    # ---- everything, for warm-up ----------------------------------------------------------
    def all(self) -> list[Shape]:
        """Every shape a call can have, most expensive first: warming the biggest first lets
        ORT's arena reach its peak at once, smaller shapes then reuse its chunks."""
        shapes: set[Shape] = set()
        least = 1 + self.pad_lone_decode
        s_ladder = sorted({bucket(n) for n in range(least, self.max_num_seqs + 1)})
        b_ladder = sorted({bucket(n) for n in range(1, self.max_blocks + 1)})
        spans = sorted({span_bucket(n) for n in range(1, self.max_blocks + 1)})
        for s in s_ladder:
            shapes.update((s, 1, b) for b in (spans if s <= FINE_ROWS else b_ladder)
                          if self.decode_ok((s, 1, b)))
        s_pow = [1 << k for k in range(pow2(self.max_num_seqs).bit_length())]
        t = 2
        while t <= self.t_max:
            shapes.update((1, t, b) for b in b_ladder if self.prefill_ok((1, t, b)))
            shapes.update((s, t, self.multi_span // s) for s in s_pow[1:]
                          if self.prefill_ok((s, t, self.multi_span // s)))
            t *= 2
        return sorted(shapes, key=lambda x: (-x[0] * x[1] * (x[2] + 16), x))
