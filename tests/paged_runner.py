"""A minimal reference runner for bundles: drives the paged-KV graph with ONNX Runtime (CPU),
owning its own pool and block tables in plain numpy. It exists so the export can be proven
against transformers independently of the runtime's batcher; it is deliberately simple rather
than fast. Block ids are handed out from a SHUFFLED list and every block starts full of finite
garbage, so any read outside a sequence's own, valid slots shows up as wrong logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgert.bundle import Bundle
from edgert.runner.step_inputs import layout


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose KV is in the pool


class PagedRunner:
    def __init__(self, bundle: Bundle, block_size: int = 4, num_blocks: int = 64, seed: int = 0):
        bundle.require_paged("tests/paged_runner.PagedRunner")
        cfg = bundle.config
        self.bundle, self.bs = bundle, block_size
        rng = np.random.default_rng(seed)
        shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        dtype = np.dtype(bundle.kv["dtype"])  # float16 for an fp16 graph
        self.pools = {}
        for pair in bundle.graph["pools"]:
            for name in pair:
                pool = rng.normal(0, 3, size=shape).astype(dtype)  # finite garbage
                pool[0] = 0.0  # the null block
                self.pools[name] = pool
        self.free = [int(b) for b in rng.permutation(np.arange(1, num_blocks))]
        self.seqs: dict[int, _Seq] = {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        for key, value in (bundle.graph.get("ort_session_config") or {}).items():
            opts.add_session_config_entry(key, str(value))  # as the runtime does
        self.session = ort.InferenceSession(str(bundle.model_path), opts,
                                            providers=["CPUExecutionProvider"])

    def run(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """One graph call for S sequences, each adding its own new tokens (possibly none).
        Returns, per sequence, logits [len(new tokens), vocab] for every new position."""
        S = len(batch)
        T = max(1, max(len(toks) for _, toks in batch))
        for sid, toks in batch:  # blocks for the past and the new tokens
            seq = self.seqs.setdefault(sid, _Seq())
            while len(seq.blocks) * self.bs < seq.length + len(toks):
                seq.blocks.append(self.free.pop())
        starts = [self.seqs[sid].length for sid, _ in batch]
        B = max(-(-(start + T) // self.bs) for start in starts)
        # The inputs come from the runtime's one implementation of the calling convention; the
        # pool, the block choice and the writes below stay this runner's own.
        x = layout((S, T, B), [toks for _, toks in batch], starts,
                   [self.seqs[sid].blocks for sid, _ in batch],
                   [range(len(toks)) for _, toks in batch], self.bs).inputs
        io = self.bundle.graph
        feed = {io["inputs"][key]: getattr(x, key) for key in (
            "input_ids", "positions", "query_lens", "context_lens", "block_tables",
            "logits_indices")}
        feed.update(self.pools)
        logits, new_kv = self.session.run(
            [io["outputs"]["logits"], io["outputs"]["new_kv"]], feed)
        for s, (sid, toks) in enumerate(batch):
            seq = self.seqs[sid]
            for t in range(len(toks)):
                p = seq.length + t
                blk, off = seq.blocks[p // self.bs], p % self.bs
                for layer, (kname, vname) in enumerate(io["pools"]):
                    self.pools[kname][blk, :, off] = new_kv[layer, 0, s, t]
                    self.pools[vname][blk, :, off] = new_kv[layer, 1, s, t]
            seq.length += len(toks)
        out, start = [], 0
        for _, toks in batch:
            out.append(logits[start:start + len(toks)])
            start += len(toks)
        return out

    def release(self, sid: int) -> None:
        self.free.extend(self.seqs.pop(sid).blocks)

    def greedy(self, prompt: list[int], max_new_tokens: int, sid: int = 0,
               eos: set[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation of one sequence: prefill, then one decode step per token.
        Returns the new tokens and the logits each was chosen from."""
        logits = self.run([(sid, list(prompt))])[0][-1]
        tokens, steps = [], []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            steps.append(logits)
            if eos and tok in eos:
                break
            logits = self.run([(sid, [tok])])[0][-1]
        self.release(sid)
        return tokens, steps
