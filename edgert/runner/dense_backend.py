"""A backend for graphs with a dense `past_key_values` convention (what Hugging Face optimum
exports: `past_key_values.{i}.key/value [batch, kv_heads, past_len, head_dim]` in,
`present.{i}.*` = past and new concatenated out), behind the same `Backend` contract as the
paged graph.

It keeps the runtime's paged pool (kv_pool.py), so the scheduler, block allocator, prefix cache,
preemption, shape menu and sampler work unchanged; only this adapter knows the graph wants a
dense past. Per call it gathers each row's blocks into a dense past padded to P = B x block_size
(B is the call's block-table width, a rung of the shape menu, so the padding is bounded the same
way the paged graph's is), masks the padding out through `attention_mask`, and writes back only
the new positions of `present`. The price is what the paged graph was designed to avoid: the past
is copied in and the whole of `present` copied out on every step (measured in the README).

Padded past slots hold stale but finite pool data and padded new tokens finite garbage: both get
mask 0, and nothing but the valid new tokens is ever written (slot -1 is skipped by the pool)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edgert.bundle import DENSE_PAST, Bundle, BundleError
from edgert.config import BackendConfig
from edgert.runner.kv_pool import KVPool
from edgert.runner.ort_backend import session_options
from edgert.runner.step_inputs import StepInputs

_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class DenseBackend:
    """model_runner.Backend for a dense-past graph: the paged pool in, a dense past per call."""

    def __init__(self, bundle: Bundle, num_blocks: int, block_size: int,
                 config: BackendConfig | None = None):
        self.config = config = config or BackendConfig()
        if config.provider != "cpu":
            raise ValueError(
                f"dense-past bundles run on the CPU provider only, not {config.provider!r} "
                "(the adapter gathers the past on the host; re-export natively for a GPU)")
        g = bundle.graph
        if bundle.convention != DENSE_PAST:
            raise BundleError(f"{bundle.path}: not a {DENSE_PAST} bundle (runner/backends.py "
                              "picks the backend)")
        cfg = bundle.config
        self.pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                           num_blocks, np.dtype(bundle.kv["dtype"]))
        self.session = ort.InferenceSession(str(bundle.model_path),
                                            session_options(config, bundle),
                                            providers=["CPUExecutionProvider"])
        self._names = g["inputs"]
        self._past = [tuple(pair) for pair in g["past"]]
        if len(self._past) != cfg.num_layers:
            raise BundleError(f"{bundle.path}: {len(self._past)} past pairs for "
                              f"{cfg.num_layers} layers")
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._int = {key: _INT_TYPES.get(types.get(name, ""), np.int64)
                     for key, name in self._names.items()}
        self._fetch = [g["outputs"]["logits"], *(n for pair in g["present"] for n in pair)]
        pool = self.pool
        # Every (layer, K/V) plane as rows of (block, kv head) slices: one np.take per plane
        # gathers a call's past straight into the graph's layout, one copy instead of a
        # fancy-index gather plus a transpose. With the reused buffer below: 22 -> 7 ms for
        # the inputs of an S=4, 1024-token decode of a 32M-parameter model.
        self._planes = pool.data.reshape(pool.num_layers * 2, pool.num_blocks * pool.num_kv_heads,
                                         pool.block_size * pool.head_dim)
        self._heads = np.arange(pool.num_kv_heads, dtype=np.intp)
        # The dense past, kept at the largest call's size (fresh pages every step fault in).
        # It is activation memory the paged graph does not have; the activation probe
        # (activation_probe.py) runs the largest calls through this backend, so the fit plan
        # counts it.
        self._scratch = np.empty(0, pool.dtype)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def feeds(self, x: StepInputs) -> dict[str, np.ndarray]:
        """The dense inputs of one call: each row's past from its block table, padded to
        P = B x block_size, and the mask that hides the padding (past beyond context_lens[s],
        new tokens beyond query_lens[s])."""
        S, T = x.input_ids.shape
        B = x.block_tables.shape[1]
        pool = self.pool
        L, kvh, bs, d = pool.num_layers, pool.num_kv_heads, pool.block_size, pool.head_dim
        P = B * bs
        # row s, head h, block b <- plane row table[s, b] * kvh + h: [L * 2, S, kvh, B, bs * d]
        index = x.block_tables.astype(np.intp)[:, None, :] * kvh + self._heads[None, :, None]
        size = L * 2 * S * kvh * P * d
        if self._scratch.size < size:
            self._scratch = np.empty(size, pool.dtype)
        past = self._scratch[:size].reshape(L * 2, S, kvh, B, bs * d)
        for plane in range(L * 2):
            np.take(self._planes[plane], index, axis=0, out=past[plane])
        past = past.reshape(L, 2, S, kvh, P, d)
        mask = np.concatenate([np.arange(P)[None, :] < x.context_lens[:, None],
                               np.arange(T)[None, :] < x.query_lens[:, None]], axis=1)
        n = self._names
        feed = {n["input_ids"]: x.input_ids.astype(self._int["input_ids"]),
                n["attention_mask"]: mask.astype(self._int["attention_mask"]),
                n["position_ids"]: x.positions.astype(self._int["position_ids"])}
        for layer, (k, v) in enumerate(self._past):
            feed[k] = past[layer, 0]
            feed[v] = past[layer, 1]
        return feed

    def run(self, x: StepInputs, slot_mapping: np.ndarray,
            cow_copies: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """One graph call on the pool; returns logits [N, vocab] on the host."""
        self.pool.copy_blocks(cow_copies)
        S, T = x.input_ids.shape
        out = self.session.run(self._fetch, self.feeds(x))
        logits, present = out[0], out[1:]
        # present.* [S, kvh, P + T, d]: only the last T positions are new -> [L, 2, S, T, kvh, d]
        new = np.stack([p[:, :, -T:].transpose(0, 2, 1, 3) for p in present])
        self.pool.write(new.reshape(self.pool.num_layers, 2, *new.shape[1:]), slot_mapping)
        return logits.reshape(S * T, -1)[x.logits_indices]
