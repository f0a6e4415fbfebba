"""Calibration: what each projection's inputs look like on real text.

The float model (the fp32 paged graph, run by ONNX Runtime: no torch) is fed `samples` windows of
`seqlen` tokens; every input of every projection and of the LM head is exposed as an extra graph
output and reduced on the fly to
- per input channel: max |x| (SmoothQuant's migration strength, W8A8 activation ranges) and mean
  |x| (AWQ-style saliency),
- optionally the Hessian proxy H = E[x x^T] that GPTQ needs (K x K per projection input).
The built-in text is the calibration part of Python's pydoc topics (export/texts.py: `edgert eval`
scores the rest, so evaluation never sees calibration text); `--calib FILE` takes any UTF-8 text
instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgert.runner.step_inputs import fresh_prefill
from export.checkpoint import Checkpoint
from export.graph import IO, DecoderGraphBuilder
from export.texts import calibration_text

LM_HEAD = "lm_head.weight"  # the LM head's key, tied or not


@dataclass(frozen=True)
class CalibConfig:
    source: str = "builtin"  # "builtin" or a path to a UTF-8 text file
    samples: int = 32
    seqlen: int = 256
    hessians: bool = True  # GPTQ needs them; RTN / W8A8 only need the channel statistics
    batch: int = 4  # windows per graph call

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2:
            raise ValueError("calibration needs >= 1 sample of >= 2 tokens")


@dataclass
class InputStats:
    """Statistics of one projection input over the calibration tokens."""

    absmax: np.ndarray  # [K] float32
    abs_sum: np.ndarray  # [K] float64
    count: int = 0
    hessian: np.ndarray | None = None  # [K, K] float64 sum of x x^T (None: not collected)

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).astype(np.float32)

    def add(self, x: np.ndarray, hessian: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        a = np.abs(x)
        self.absmax = np.maximum(self.absmax, a.max(axis=0))
        self.abs_sum += a.sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]
        if hessian:
            if self.hessian is None:
                self.hessian = np.zeros((x.shape[1], x.shape[1]), np.float64)
            self.hessian += x.T @ x


@dataclass
class Calibration:
    config: CalibConfig
    token_sha256: str
    tokens: int
    stats: dict[str, InputStats] = field(default_factory=dict)  # by weight name

    def manifest(self) -> dict[str, Any]:
        src = self.config.source
        return {"source": "builtin:pydoc_data.topics (calibration half)" if src == "builtin"
                else str(src), "samples": self.config.samples, "seqlen": self.config.seqlen,
                "tokens": self.tokens, "token_sha256": self.token_sha256,
                "statistics_file": "calibration.npz"}

    def to_npz(self, path: Path) -> None:
        """The per-channel statistics (not the Hessians: ~400 MB for SmolLM2), kept in the
        bundle so activation ranges can be re-derived (e.g. by a TensorRT builder)."""
        arrays: dict[str, np.ndarray] = {}
        for name, s in self.stats.items():
            arrays[f"{name}/absmax"] = s.absmax
            arrays[f"{name}/mean_abs"] = s.mean_abs
        np.savez(path, **arrays)


class _RecordingBuilder(DecoderGraphBuilder):
    """The fp32 graph, remembering which tensor feeds each projection and the LM head."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self.inputs: dict[str, str] = {}

    def linear(self, x: str, weight_t: np.ndarray, name: str) -> str:
        self.inputs[name] = x
        return super().linear(x, weight_t, name)

    def lm_head(self, rows: str) -> str:
        self.inputs[LM_HEAD] = rows
        return super().lm_head(rows)


def calibration_tokens(encode: Callable[[str], list[int]], cfg: CalibConfig) -> np.ndarray:
    """[samples, seqlen] windows spread evenly over the text (deterministic)."""
    text = calibration_text() if cfg.source == "builtin" else Path(cfg.source).read_text(
        encoding="utf-8")
    ids = np.asarray(encode(text), np.int32)
    if len(ids) < cfg.seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of "
                         f"{cfg.seqlen}")
    starts = np.linspace(0, len(ids) - cfg.seqlen, cfg.samples).astype(np.int64)
    return np.stack([ids[s: s + cfg.seqlen] for s in starts])


def calibrate(ckpt: Checkpoint, cfg: CalibConfig, threads: int = 0,
              progress: Callable[[int], None] | None = None) -> Calibration:
    """Run the float model over the calibration windows and collect InputStats."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    windows = calibration_tokens(lambda s: tok.encode(s, add_special_tokens=False).ids, cfg)
    builder = _RecordingBuilder(ckpt)
    model = builder.build()
    tensors = dict(builder.inputs)
    for tensor in dict.fromkeys(tensors.values()):
        model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    del model
    cfgm = ckpt.config
    pool = np.zeros((1, cfgm.num_kv_heads, 16, cfgm.head_dim), np.float32)
    pools = {name: pool for layer in range(cfgm.num_layers)
             for name in (IO.pool_key(layer), IO.pool_value(layer))}
    names = list(dict.fromkeys(tensors.values()))
    stats = {w: InputStats(np.zeros(0, np.float32), np.zeros(0, np.float64))
             for w in tensors}
    for i in range(0, len(windows), cfg.batch):
        ids = windows[i: i + cfg.batch]
        s, t = ids.shape
        # every 4th position through the LM head: enough rows for its statistics
        x = fresh_prefill(ids.astype(np.int32), 16, np.arange(0, s * t, 4))
        feed = {IO.input_ids: x.input_ids, IO.positions: x.positions, IO.query_lens: x.query_lens,
                IO.context_lens: x.context_lens, IO.block_tables: x.block_tables,
                IO.logits_indices: x.logits_indices, **pools}
        outs = dict(zip(names, session.run(names, feed)))
        for wname, tensor in tensors.items():
            x = outs[tensor]
            st = stats[wname]
            if st.count == 0:
                st.absmax = np.zeros(x.shape[-1], np.float32)
                st.abs_sum = np.zeros(x.shape[-1], np.float64)
            st.add(x, cfg.hessians)
        if progress:
            progress(len(ids))
    digest = hashlib.sha256(windows.tobytes()).hexdigest()
    return Calibration(cfg, digest, int(windows.size), stats)
