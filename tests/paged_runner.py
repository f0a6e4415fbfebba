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


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose KV is in the pool


class PagedRunner:
    def __init__(self, bundle: Bundle, block_size: int = 4, num_blocks: int = 64, seed: int = 0):
        cfg = bundle.config
        self.bundle, self.bs = bundle, block_size
        rng = np.random.default_rng(seed)
        shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.pools = {}
        for pair in bundle.graph["pools"]:
            for name in pair:
                pool = rng.normal(0, 3, size=shape).astype(np.float32)  # finite garbage
                pool[0] = 0.0  # the null block
                self.pools[name] = pool
        self.free = [int(b) for b in rng.permutation(np.arange(1, num_blocks))]
        self.seqs: dict[int, _Seq] = {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(bundle.model_path), opts,
                                            providers=["CPUExecutionProvider"])

    def run(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """One graph call for S sequences, each adding its own new tokens (possibly none).
        Returns, per sequence, logits [len(new tokens), vocab] for every new position."""
        S = len(batch)
        T = max(1, max(len(toks) for _, toks in batch))
        ids = np.zeros((S, T), np.int32)
        pos = np.zeros((S, T), np.int32)
        qlen = np.zeros(S, np.int32)
        ctx = np.zeros(S, np.int32)
        for s, (sid, toks) in enumerate(batch):
            seq = self.seqs.setdefault(sid, _Seq())
            ids[s, :len(toks)] = toks
            pos[s, :len(toks)] = np.arange(seq.length, seq.length + len(toks))
            qlen[s], ctx[s] = len(toks), seq.length
        # Tables cover the past and this call's T slots (the graph places the new K/V among the
        # gathered keys), padded with the null block 0 to the longest.
        for sid, toks in batch:
            seq = self.seqs[sid]
            while len(seq.blocks) * self.bs < seq.length + len(toks):
                seq.blocks.append(self.free.pop())
        B = max(-(-(self.seqs[sid].length + T) // self.bs) for sid, _ in batch)
        tables = np.zeros((S, B), np.int32)
        for s, (sid, _) in enumerate(batch):
            own = self.seqs[sid].blocks
            tables[s, :len(own)] = own
        index = np.array([s * T + t for s, (_, toks) in enumerate(batch)
                          for t in range(len(toks))], np.int32)
        io = self.bundle.graph
        feed = {io["inputs"]["input_ids"]: ids, io["inputs"]["positions"]: pos,
                io["inputs"]["query_lens"]: qlen, io["inputs"]["context_lens"]: ctx,
                io["inputs"]["block_tables"]: tables, io["inputs"]["logits_indices"]: index,
                **self.pools}
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
