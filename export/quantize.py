"""Quantized export: which grid each weight gets, how it is chosen, and the graph that runs it.

`QuantConfig` is what the CLI asks for; `QuantizedGraphBuilder` overrides the float builder's
three hooks (`linear` for every projection, `embedding`, `lm_head`), quantizes each weight as it
is reached (round-to-nearest or GPTQ from one calibration pass) and emits the flavour's operators
(quant_graph.py). Both flavours of a precision come from the same codes: only the operators
differ. The manifest's `quantization` section records, per weight, exactly what was done (bits,
block size actually used, symmetry, zero-point kind, scale dtype, activation handling, operator),
so the runtime and a TensorRT builder read the scheme instead of guessing it.

Defaults, each chosen by measurement on SmolLM2-135M (perplexity on held-out text vs fp32):
- int8 cpu: GPTQ weights in blocks of 32 (64: 0.9x the step time, a little less accurate) with
  SmoothQuant (alpha 0.75) through MatMulNBits' 8-bit kernel, activations quantized per row and
  block. The issue's per-channel weights with per-row activation scales (MatMulInteger,
  `int8_kernel="rows"`) measured +0.3% to +4.6% and 95-96% top-1 agreement depending on
  smoothing/GPTQ, blocks +0.5% and 97.7%.
- int8 portable: W8A8 with static per-tensor activation scales (TensorRT's int8 GEMM) where that
  works, W8A16 for the down projection and the LM head (see `weight_only`).
- fp16 and the portable flavours are float16 graphs (graph.py: float16 activations and KV pool,
  RMSNorm / softmax / RoPE tables in float32, float32 logits), every DequantizeLinear scale
  float16 and strictly positive (quant_formats.SCALE_FLOOR; the manifest counts clamped scales);
  the cpu flavours keep float32 activations (ORT's fused kernels).
- int4: GPTQ (with a per-block clipping search when symmetric); symmetric by default (TensorRT).
- the int8 embedding table is shared with a tied LM head; cpu stores it on llama.cpp's Q8_0 grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from export.calibration import LM_HEAD, CalibConfig, Calibration, calibrate
from export.checkpoint import Checkpoint
from export.gates import quality_gate
from export.gptq import gptq
from export.graph import CPU_OPSET, OPSET, DecoderGraphBuilder
from export.quant_formats import SCALE_FLOOR, Grid, QuantizedWeight, choose_block, rtn
from export.quant_graph import QuantOps

PRECISIONS = ("fp32", "fp16", "int8", "int4")
FLAVOURS = ("portable", "cpu")
METHODS = ("gptq", "rtn")
TABLE_PRECISIONS = ("fp32", "fp16", "int8")  # embedding / tied LM head table
HEAD_PRECISIONS = ("fp32", "fp16", "int8", "int4")
KV_DTYPES = ("auto", "float32", "float16")
MS_DOMAIN = "com.microsoft"
EMBED = "model.embed_tokens.weight"
# ONNX Runtime fuses Q/DQ around a MatMul into a u8s8 integer GEMM whose int16 pair sums
# saturate on AVX2 CPUs without VNNI (outputs measurably wrong), and a blocked int4 DQ feeding a
# MatMul into MatMulNBits at accuracy level 4 (int8 activations: 15% of the logits' range off on a
# tiny model); running Q/DQ as written is exact. Written to the manifest
# (graph.ort_session_config) for any ORT session of a graph with Q/DQ nodes.
PORTABLE_INT8_ORT_CONFIG = {"session.disable_quant_qdq": "1"}
PORTABLE_ORT_CONFIG = PORTABLE_INT8_ORT_CONFIG


INT8_KERNELS = ("blocks", "rows", "mixed")
# --int8-kernel mixed: the layers on MatMulInteger. gate_up carries half the body's multiply-adds
# and its input is an RMSNorm's output, smoothed, which a per-row scale covers; adding qkv
# (also fed by a norm) measured top-1 96.60% instead of 97.02% on SmolLM2 (README)
ROWS_IN_MIXED = ("mlp.gate_up_proj",)


@dataclass(frozen=True)
class QuantConfig:
    precision: str = "fp32"
    flavour: str = "cpu"
    group_size: int = 32  # int4 block along the input dimension (asked; see choose_block)
    method: str | None = None  # None: gptq
    symmetric: bool = True
    zero_point: str = "float"  # asymmetric only: "float" (Q4_1's min) or "int" (uint8 codes)
    # int4 block scales; int8 per-channel scales are the activation dtype in portable, float32 in
    # cpu's MatMulInteger kernel (its blocked kernel takes this one)
    scale_dtype: str = "float16"
    embedding: str | None = None  # None: int8 for int8/int4, else the precision
    lm_head: str | None = None  # None: the embedding's (tied: one shared table)
    smooth_alpha: float | None = None  # SmoothQuant (int8); None: 0.75 cpu, 0.5 portable
    clip_search: bool | None = None  # per-block range search; None: on for symmetric int4
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations per block
    # int8 layers whose name contains one of these keep float activations (W8A16); None: the
    # flavour's default (portable: the down projection and the LM head, whose inputs carry
    # per-token outliers a static per-tensor scale cannot cover: +35% perplexity measured)
    weight_only: tuple[str, ...] | None = None
    # cpu int8 kernel. "blocks" (default): MatMulNBits(bits=8), weight scales per output
    # channel AND block of `int8_block` inputs, activations quantized per row and block inside
    # the kernel. "rows": per-channel weights, per-row activation scales, u8u8 MatMulInteger:
    # faster at batch >= 16 and in prefill, but measurably less accurate on SmolLM2 (README).
    # "mixed": rows for the MLP's gate_up projection only (ROWS_IN_MIXED), blocks elsewhere.
    int8_kernel: str = "blocks"
    # 32 by default; 64 is faster (SmolLM2 int8, float16 pool, Zen 4: graph steps 0.88-0.90x
    # the time, perplexity +0.26% instead of +0.20%, top-1 97.44% instead of 97.53%; with a
    # float32 pool +0.35% and 97.30%, near the 97% gate, and unmeasured on AVX2; 128: 97.03%)
    int8_block: int = 32
    # The KV pools' dtype: "auto" = the activation dtype; float16 halves a float32 graph's pool
    # (graph.py rounds the new K/V before attention, so batch invariance holds)
    kv_dtype: str = "auto"
    # cpu flavours: the step's K/V joins the gathered past by ScatterND ("scatter") or in place
    # by TensorScatter ("in-place", opset 24: a float16 pool widened into a fresh buffer; faster
    # at long contexts, the same memory). "auto": in-place wherever it applies (graph.py, README)
    kv_write: str = "auto"
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if self.precision == "fp16":  # ORT's fused CPU kernels take float32 activations only,
            object.__setattr__(self, "flavour", "portable")  # so a quantized head is Q/DQ
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (awq is not implemented)")
        if self.embedding is not None and self.embedding not in TABLE_PRECISIONS:
            raise ValueError(f"embedding precision must be one of {TABLE_PRECISIONS}")
        if self.lm_head is not None and self.lm_head not in HEAD_PRECISIONS:
            raise ValueError(f"LM head precision must be one of {HEAD_PRECISIONS}")
        if self.kv_write not in ("auto", "scatter", "in-place"):
            raise ValueError("kv_write must be 'auto', 'scatter' or 'in-place'")
        if self.kv_write == "in-place" and self.graph_flavour != "cpu":
            raise ValueError("--kv-write in-place is for the cpu flavours (TensorScatter is "
                             "opset 24; TensorRT 10 reads opsets up to 21)")
        if self.kv_write == "in-place" and self.kv_dtype != "float16":
            raise ValueError(
                "--kv-write in-place needs --kv-dtype float16: written into a float32 pool's "
                "gathered past, ORT keeps every layer's copy alive to the end of the call "
                "(SmolLM2: 770 MiB of activations instead of 65 at 16 sequences over 1k tokens)")
        if self.int8_kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel must be one of {', '.join(INT8_KERNELS)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"KV dtype must be one of {KV_DTYPES}")
        if self.activation_dtype == "float16" and self.kv_dtype == "float32":
            what, fix = (("fp16", "--precision fp32") if self.precision == "fp16"
                         else (f"{self.precision}/portable", "--flavour cpu"))
            raise ValueError(f"--kv-dtype float32 needs a float32 graph; {what} computes in "
                             f"float16, so its KV pool is float16 (use auto, or {fix})")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise ValueError("group size must be one of 16, 32, 64, 128, 256")
        if not self.symmetric and not self.has_int4:
            raise ValueError("--asymmetric is for int4 weights (--precision int4 or "
                             "--lm-head-precision int4); this configuration has none")
        if not self.symmetric and self.graph_flavour == "portable":
            raise ValueError(
                "the portable flavour is symmetric int4 (TensorRT's DequantizeLayer takes zero "
                "point 0 only); " + ("a float16 graph is portable: its int4 head is "
                                     "symmetric" if self.precision == "fp16"
                                     else "use --flavour cpu for --asymmetric"))
        if (self.activation_dtype == "float16" and self.scale_dtype != "float16"
                and self.has_int4):
            raise ValueError(
                "the portable flavour's scales are float16: its activations are float16 and a "
                "strongly typed DequantizeLinear outputs its scale's type (--scale-dtype float32 "
                "is for --flavour cpu)")

    @property
    def activation_dtype(self) -> str:
        """float16 for fp16 and the portable int8/int4 graphs (what TensorRT builds as a
        strongly typed network); float32 for fp32 and the cpu flavours (ORT's fused kernels
        take float32)."""
        if self.precision == "fp16" or (self.precision in ("int8", "int4")
                                        and self.flavour == "portable"):
            return "float16"
        return "float32"

    @property
    def in_place_kv(self) -> bool:
        """Whether the graph writes the step's K/V by TensorScatter (see kv_write)."""
        if self.kv_write == "auto":
            return (self.graph_flavour == "cpu" and self.kv_dtype == "float16"
                    and self.activation_dtype == "float32")
        return self.kv_write == "in-place"

    @property
    def kv_pool_dtype(self) -> str:
        """The KV pools' and new_kv's dtype: kv_dtype, "auto" being the activation dtype."""
        return self.activation_dtype if self.kv_dtype == "auto" else self.kv_dtype

    def int8_kernel_of(self, layer: str) -> str:
        """The cpu int8 kernel of one layer. "mixed" runs the MLP's gate_up on MatMulInteger,
        whose u8u8 kernel is 2-3x MatMulNBits' 8-bit speed at 16+ rows on AVX2 without VNNI
        (README), and keeps the blocked kernel where per-token outliers need its per-block
        activation scales (o_proj, down_proj, the head)."""
        if self.int8_kernel != "mixed":
            return self.int8_kernel
        return "rows" if any(p in layer for p in ROWS_IN_MIXED) else "blocks"

    @property
    def weight_only_layers(self) -> tuple[str, ...]:
        if self.weight_only is not None:
            return self.weight_only
        return ("mlp.down_proj", "lm_head") if self.flavour == "portable" else ()

    @property
    def is_plain_fp32(self) -> bool:
        """The float graph exactly as the unquantized exporter writes it."""
        return self.precision == "fp32" and self.embedding_precision == "fp32" and (
            self.lm_head_precision == "fp32")

    @property
    def resolved_method(self) -> str:
        return self.method or "gptq"

    @property
    def embedding_precision(self) -> str:
        if self.embedding:
            return self.embedding
        return "int8" if self.precision in ("int8", "int4") else self.precision

    @property
    def lm_head_precision(self) -> str:
        return self.lm_head or self.embedding_precision

    @property
    def alpha(self) -> float | None:
        """SmoothQuant strength for int8 activations (0 = off); measured on SmolLM2: 0.75
        beats 0.5 for the dynamic cpu kernels."""
        if self.smooth_alpha is not None:
            return self.smooth_alpha or None
        if self.precision != "int8":
            return None
        return 0.75 if self.flavour == "cpu" else 0.5

    @property
    def uses_clip_search(self) -> bool:
        if self.clip_search is not None:
            return self.clip_search
        return self.precision == "int4" and self.symmetric

    @property
    def graph_flavour(self) -> str:
        """fp32 / fp16 graphs use standard ops only, whatever was asked."""
        return self.flavour if "int" in self.precision + self.lm_head_precision else "portable"

    @property
    def has_int4(self) -> bool:
        """Whether any weight is int4 (the body or the LM head; an embedding never is)."""
        return "int4" in (self.precision, self.lm_head)

    @property
    def coarsest(self) -> str:
        """The lowest precision among the weights (body, embedding, LM head) and the KV pool
        (a float16 pool rounds every cached K/V)."""
        kv = "fp16" if self.kv_pool_dtype == "float16" else "fp32"
        return max((self.precision, self.embedding_precision, self.lm_head_precision, kv),
                   key=PRECISIONS.index)

    @property
    def gate(self) -> float | None:
        """The allowed perplexity rise: that of the coarsest part, so that a float or int8
        body with an int4 head is held to int4's gate, and a float body with a float16 pool to
        fp16's, never to none."""
        p = self.coarsest
        return quality_gate(p, self.graph_flavour, self.symmetric or p != "int4")

    def needs_calibration(self) -> bool:
        """GPTQ's Hessians and SmoothQuant's ranges come from calibration, for the body's
        projections or a quantized LM head alone."""
        quantized = [p for p in (self.precision, self.lm_head_precision) if p in ("int8", "int4")]
        return bool(quantized) and (
            self.resolved_method == "gptq" or self.alpha is not None
            or (self.graph_flavour == "portable" and "int8" in quantized))

    def calib_config(self) -> CalibConfig:
        return replace(self.calib, hessians=self.resolved_method == "gptq")


class QuantizedGraphBuilder(DecoderGraphBuilder):
    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig,
                 calibration: Calibration | None = None,
                 progress: Callable[[int], None] | None = None):
        super().__init__(ckpt, progress, dtype=qcfg.activation_dtype,
                         kv_dtype=qcfg.kv_pool_dtype)
        self.q = qcfg
        self.calibration = calibration
        self.ops = QuantOps(self.b, qcfg.accuracy_level, act=self.act)
        assert not (self.float16 and qcfg.graph_flavour == "cpu"), "cpu kernels are float32"
        if qcfg.graph_flavour == "cpu":  # ORT only: fused RoPE and norms, K/V placed in place
            self.fused_rope, self.in_place_kv, self.opsets[""] = True, qcfg.in_place_kv, CPU_OPSET
            self.skip_norms = True
        self.layers: dict[str, dict[str, Any]] = {}
        self.quantized: dict[str, QuantizedWeight] = {}  # what the graph computes with
        self._table: dict[str, Any] | None = None  # the int8 embedding table, if shared
        self._folded: dict[str, np.ndarray] = {}  # down_proj -> its smoothing, in up's rows

    # ---- helpers -------------------------------------------------------------------------
    def _stats(self, name: str):
        if self.calibration is None:
            return None
        return self.calibration.stats.get(name)

    def _int8_scale_dtype(self) -> str:
        """Per-channel int8 weight scales: the activation dtype in portable (a DequantizeLinear
        outputs its scale's type), float32 for the cpu MatMulInteger kernel."""
        return self.dtype if self.q.flavour == "portable" else "float32"

    @staticmethod
    def _clamped(qw: QuantizedWeight) -> int:
        """Scales that grid_params raised from 0 to the floor of their dtype (all-zero blocks,
        and blocks whose scale rounds to 0): the floor with every code of the block 0 (a block
        whose scale is naturally the floor has its largest weight at a code near qmax)."""
        at_floor = qw.scale <= SCALE_FLOOR[qw.grid.scale_dtype]
        codes = qw.codes.reshape(qw.n, qw.blocks, qw.block)
        return int((at_floor & ~codes.any(axis=-1)).sum())

    def _grid(self, bits: int) -> Grid:
        q = self.q
        if bits == 8:
            return Grid(8, None, True, None, self._int8_scale_dtype())
        return Grid(4, q.group_size, q.symmetric, None if q.symmetric else q.zero_point,
                    q.scale_dtype)

    def _quantize(self, name: str, w: np.ndarray, bits: int, method: str,
                  smooth: np.ndarray | None = None, grid: Grid | None = None
                  ) -> QuantizedWeight:
        """w [out, in] -> codes on this layer's grid; `smooth` scales input columns first."""
        k = w.shape[1]
        if grid is None:
            grid = self._grid(bits)
        if bits == 4:
            grid = replace(grid, block=choose_block(k, self.q.group_size, self.q.flavour))
        if smooth is not None:
            w = w * smooth[None, :]
        stats = self._stats(name)
        if method == "gptq":
            if stats is None or stats.hessian is None:
                raise ValueError(f"{name}: GPTQ needs calibration Hessians")
            h = stats.hessian
            if smooth is not None:  # inputs are x / s
                h = h / np.outer(smooth, smooth)
            qw = gptq(name, w, h, grid, clip=self.q.uses_clip_search)
        else:
            importance = None
            if stats is not None and stats.hessian is not None:
                importance = np.diag(stats.hessian).astype(np.float32)
            qw = rtn(name, w, grid, search=bits == 4 and self.q.uses_clip_search,
                     importance=importance)
        self.quantized[name] = qw
        return qw

    def _smoothing(self, name: str, w: np.ndarray) -> np.ndarray | None:
        """SmoothQuant: s_j = max|x_j|^a / max|W_:,j|^(1-a); x/s is flatter per tensor."""
        alpha = self.q.alpha
        stats = self._stats(name)
        if alpha is None or stats is None:
            return None
        wmax = np.maximum(np.abs(w).max(axis=0), 1e-5)
        amax = np.maximum(stats.absmax, 1e-5)
        s = amax ** alpha / wmax ** (1 - alpha)
        return np.clip(s, 1e-4, 1e4).astype(np.float32)

    def _act_scale(self, name: str, smooth: np.ndarray | None) -> tuple[float, bool]:
        """The static per-tensor activation scale, exact in the activation dtype and at least
        its floor; and whether it was clamped up to that floor."""
        stats = self._stats(name)
        if stats is None:
            raise ValueError(f"{name}: static activation scales need calibration")
        amax = stats.absmax / (smooth if smooth is not None else 1.0)
        scale = np.float32(max(float(amax.max()), 1e-8) / 127.0)
        rounded = float(np.asarray(scale).astype(self.np_act))
        return (rounded, False) if rounded > 0 else (SCALE_FLOOR[self.dtype], True)

    def _emit(self, x: str, w: np.ndarray, name: str, precision: str, rank: int,
              out: str | None = None, allow_smooth: bool = True,
              row_scale: np.ndarray | None = None) -> str:
        """x @ w.T for w [out, in] at `precision`, recording the layer's scheme. `row_scale`
        multiplies output rows after this layer's own smoothing is chosen from `w`."""
        q, ops, b = self.q, self.ops, self.b
        smooth = None
        if precision == "int8" and allow_smooth:
            smooth = self._folded.get(name)
            smooth = self._smoothing(name, w) if smooth is None else smooth
        if row_scale is not None:
            w = w * row_scale[:, None]
        if precision == "fp32":
            self.layers[name] = {"precision": "fp32", "op": "MatMul"}
            wc = b.const(np.ascontiguousarray(w.T, np.float32), name)
            if not self.float16:
                return b.op("MatMul", x, wc, name=out)
            # float32 asked inside a float16 graph (only the LM head can be): float32 compute
            self.layers[name]["op"] = "Cast+MatMul"
            y = b.op("MatMul", self.cast(x, onnx.TensorProto.FLOAT), wc,
                     name=self.logits_f32 if out == self.logits_out else None)
            return y if out == self.logits_out else self.cast(y, self.act)
        if precision == "fp16":
            self.layers[name] = {"precision": "fp16", "op": "MatMul", "weight_dtype": "float16"}
            return ops.fp16_matmul(x, np.ascontiguousarray(w.T), name, out)
        method = q.resolved_method
        if precision == "int8":
            folded = name in self._folded  # its input arrives divided by s already
            inv = None if smooth is None or folded else b.const(
                1.0 / smooth, name + ".smooth_inv", self.np_act)
            if q.flavour == "cpu" and q.int8_kernel_of(name) == "blocks":
                self.opsets[MS_DOMAIN] = 1
                grid = Grid(8, choose_block(w.shape[1], q.int8_block, "cpu"), True, None,
                            q.scale_dtype)
                qw = self._quantize(name, w, 8, method, smooth, grid)
                xs = x if inv is None else b.op("Mul", x, inv)
                y = ops.int8_blocked_matmul(xs, ops.int8_blocked_table(qw, name), out)
                self.layers[name] = qw.manifest(
                    scales_clamped=self._clamped(qw),
                    precision="int8", op="MatMulNBits(bits=8)", weight_storage="uint8+128",
                    activation={"bits": 8, "granularity": "per_row_per_block",
                                "mode": "dynamic", "accuracy_level": 4,
                                "smoothing": self._smoothing_manifest(name, smooth)})
                return y
            qw = self._quantize(name, w, 8, method, smooth)
            if any(p in name for p in q.weight_only_layers):
                wq, ws = ops.int8_weight_s8(qw, name)
                act = None
                y = ops.int8_weight_only(x, wq, ws, inv, out)
                op = "DequantizeLinear+MatMul"
            elif q.flavour == "cpu":
                wq, ws = ops.int8_weight_u8(qw, name)
                act = {"bits": 8, "granularity": "per_row", "mode": "dynamic",
                       "symmetric": True, "dtype": "uint8", "zero_point": 128}
                y = ops.int8_dynamic_rows(x, wq, ws, inv, out)
                op = "MatMulInteger"
            else:
                wq, ws = ops.int8_weight_s8(qw, name)
                scale, clamped = self._act_scale(name, smooth)
                act = {"bits": 8, "granularity": "per_tensor", "mode": "static",
                       "symmetric": True, "dtype": "int8", "scale": scale,
                       "scale_dtype": self.dtype, "scale_clamped": clamped}
                y = ops.int8_static(x, wq, ws, scale, inv, out)
                op = "QDQ+MatMul"
            if act is not None:
                act["smoothing"] = self._smoothing_manifest(name, smooth)
            self.layers[name] = qw.manifest(
                precision="int8", op=op, activation=act, scales_clamped=self._clamped(qw),
                weight_storage="uint8+128" if op == "MatMulInteger" else "int8")
            return y
        qw = self._quantize(name, w, 4, method)
        if q.flavour == "cpu":
            self.opsets[MS_DOMAIN] = 1
            y = ops.int4_matmulnbits(x, qw, name, rank, out)
            op = "MatMulNBits" + ("+min_correction" if qw.grid.zero_point == "float" else "")
            extra = {"accuracy_level": q.accuracy_level}
        else:
            y = ops.int4_dq(x, qw, name, out)
            op, extra = "DequantizeLinear(blocked)+MatMul", {}
        self.layers[name] = qw.manifest(precision="int4", op=op, activation=None,
                                        scales_clamped=self._clamped(qw), **extra)
        return y

    def _smoothing_manifest(self, name: str, smooth: np.ndarray | None) -> dict | None:
        if smooth is None:
            return None
        into = name.replace("down_proj", "gate_up_proj") + " (up rows)"
        return {"alpha": self.q.alpha, **({"folded_into": into} if name in self._folded else {})}

    def _down_smoothing(self, gate_up: str) -> np.ndarray | None:
        """The MLP's down projection divides its input by s (SmoothQuant). That input is
        act(gate) * up, linear in up: dividing up's weight rows by s gives the same input
        without a Mul before the down projection (a kernel fewer per layer; measured with the
        norms' fold in graph.py). A row scales every block of it, so up's codes stay but for
        the float16 rounding of its scales (a few by one or two steps, after GPTQ)."""
        down = gate_up.replace("gate_up_proj", "down_proj")
        if not self.fold_scales or self.q.precision != "int8" or self.float16:  # graph.py
            return None
        s = self._smoothing(down, self.ckpt.weight(down))
        if s is not None:
            self._folded[down] = s
        return s

    # ---- the hooks ------------------------------------------------------------------------
    def linear(self, x: str, weight_t: np.ndarray, name: str) -> str:
        w = np.ascontiguousarray(weight_t.T)
        rows = None
        if name.endswith("mlp.gate_up_proj.weight"):
            s = self._down_smoothing(name)
            if s is not None:  # [gate; up] rows: up's divided by the down projection's s
                rows = np.concatenate([np.ones(len(w) - len(s), np.float32), 1.0 / s])
        # o_proj's 1/s would stay a Mul of its own (no weight before it to fold into); the cpu
        # kernel quantizes activations per block of each row, where smoothing buys little
        smooth = not (name.endswith("self_attn.o_proj.weight") and self.q.graph_flavour == "cpu")
        return self._emit(x, w, name, self.q.precision, rank=3, row_scale=rows,
                          allow_smooth=smooth)

    def _shared_table(self) -> bool:
        q = self.q
        return (self.cfg.tie_word_embeddings and q.embedding_precision == "int8"
                and q.lm_head_precision == "int8")

    def _int8_table(self) -> dict[str, Any]:
        """The int8 embedding table; when tied, the LM head's weight too (stored once).

        cpu: blocks of 32 along the hidden dimension with float16 scales, llama.cpp's Q8_0 grid
        (GGUF embeddings usually ARE Q8_0, which this then reproduces exactly), laid out as
        MatMulNBits' 8-bit B [vocab, blocks, 32]: the Gather reads the same bytes.
        portable: one scale per vocabulary row (per output channel of the LM head), what
        TensorRT's int8 GEMM takes (it has no int8 block scales), as [hidden, vocab]."""
        if self._table is None:
            e = self.ckpt.weight(EMBED)
            if self.q.flavour == "cpu":
                qw = rtn(EMBED, e, Grid(8, 32, True, None, "float16"))  # tail padded
                self._table = {"qw": qw, "kind": "blocked",
                               **self.ops.int8_blocked_table(qw, EMBED)}
            else:
                qw = rtn(EMBED, e, Grid(8, None, True, None, self._int8_scale_dtype()))
                wq, ws = self.ops.int8_weight_s8(qw, EMBED)
                self._table = {"qw": qw, "kind": "per_row", "weight": wq, "scale": ws}
            self.quantized[EMBED] = qw
        return self._table

    def embedding(self, ids: str) -> str:
        prec = self.q.embedding_precision
        b = self.b
        if prec == "fp32" and not self.float16:
            self.layers[EMBED] = {"precision": "fp32", "op": "Gather"}
            return super().embedding(ids)
        e = self.ckpt.weight(EMBED)
        if prec in ("fp32", "fp16"):
            storage = np.float32 if prec == "fp32" else np.float16
            rows = b.op("Gather", b.const(e, EMBED, storage), ids, axis=0)
            self.layers[EMBED] = {
                "precision": prec, "weight_dtype": np.dtype(storage).name,
                "op": "Gather" if np.dtype(storage) == self.np_act else "Gather+Cast"}
            return self.ops._to_act(rows, storage)
        t = self._int8_table()
        shared = self._shared_table()
        if t["kind"] == "blocked":
            self.layers[EMBED] = t["qw"].manifest(
                precision="int8", op="Gather+Cast+Mul(block scales)", activation=None,
                layout="[vocab, blocks, block]", shared_with_lm_head=shared,
                scales_clamped=self._clamped(t["qw"]),
                weight_storage="uint8+128")
            return self.ops.int8_blocked_gather(t, ids, self.cfg.hidden_size)
        # Dequantize the table, then gather: TensorRT 10 has INT8 only on the quantized side of
        # Q/DQ (no int8 Gather, Transpose or Cast). The DQ is the embedding's own (the tied LM
        # head has another on the same codes: one consumer per DQ, as Q/DQ graphs want); the
        # values are those of gathering the codes first (scale * code, rounded once).
        table = b.op("DequantizeLinear", t["weight"], t["scale"], axis=1)  # [hidden, vocab]
        rows = b.op("Gather", table, ids, axis=1)  # [hidden, S, T]
        self.layers[EMBED] = t["qw"].manifest(
            precision="int8", op="DequantizeLinear+Gather(axis=1)+Transpose", activation=None,
            layout="[hidden, vocab]", shared_with_lm_head=shared, weight_storage="int8",
            scales_clamped=self._clamped(t["qw"]))
        return self.ops._to_act(b.op("Transpose", rows, perm=[1, 2, 0]),
                                np.dtype(t["qw"].grid.scale_dtype))

    def lm_head(self, rows: str) -> str:
        """Logits under `logits_out` (float16 in a float16 graph: `build` casts them), or
        directly under IO.logits when computed in float32."""
        prec = self.q.lm_head_precision
        tied = self.cfg.tie_word_embeddings
        out = self.logits_out
        if prec == "fp32" and self.q.embedding_precision == "fp32":
            if not self.float16:
                self.layers[LM_HEAD] = {"precision": "fp32", "op": "Gemm", "tied": tied}
                return super().lm_head(rows)
            if tied:  # the float32 embedding table, float32 compute
                self.layers[LM_HEAD] = {"precision": "fp32", "op": "Cast+Gemm", "tied": True,
                                        "shares": EMBED}
                return self.b.op("Gemm", self.cast(rows, onnx.TensorProto.FLOAT), EMBED,
                                 transB=1, name=self.logits_f32)
        if tied and prec == "fp16" and self.q.embedding_precision == "fp16":
            self.layers[LM_HEAD] = {"precision": "fp16", "op": "Gemm", "tied": True,
                                    "shares": EMBED, "weight_dtype": "float16"}
            head = self.ops._to_act(EMBED, np.float16)
            if head != EMBED:
                self.layers[LM_HEAD]["op"] = "Cast+Gemm"
            return self.b.op("Gemm", rows, head, transB=1, name=out)
        if self._shared_table():
            t = self._int8_table()
            if t["kind"] == "blocked":
                self.opsets[MS_DOMAIN] = 1
                y = self.ops.int8_blocked_matmul(rows, t, out=out)
                act = {"bits": 8, "granularity": "per_row_per_block", "mode": "dynamic",
                       "accuracy_level": 4}
                op = "MatMulNBits(bits=8)"
            elif any(p in LM_HEAD for p in self.q.weight_only_layers):
                y = self.ops.int8_weight_only(rows, t["weight"], t["scale"], out=out)
                act, op = None, "DequantizeLinear+MatMul"
            else:
                scale, clamped = self._act_scale(LM_HEAD, None)
                y = self.ops.int8_static(rows, t["weight"], t["scale"], scale, out=out)
                act = {"bits": 8, "granularity": "per_tensor", "mode": "static",
                       "symmetric": True, "dtype": "int8", "scale": scale,
                       "scale_dtype": self.dtype, "scale_clamped": clamped}
                op = "QDQ+MatMul"
            self.layers[LM_HEAD] = t["qw"].manifest(precision="int8", op=op, activation=act,
                                                    tied=True, shares=EMBED,
                                                    scales_clamped=self._clamped(t["qw"]))
            return y
        w = self.ckpt.lm_head()
        y = self._emit(rows, w, LM_HEAD, prec, rank=2, out=out, allow_smooth=False)
        self.layers[LM_HEAD]["tied"] = tied
        self.layers[LM_HEAD]["shares"] = None
        return y

    # ---- the manifest ---------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        q = self.q
        return {
            "method": q.resolved_method,
            "flavour": q.graph_flavour,
            "group_size": q.group_size if q.has_int4 else None,
            "symmetric": q.symmetric,
            "zero_point": None if q.symmetric else q.zero_point,
            "scale_dtype": q.scale_dtype,
            "activation_dtype": self.dtype,
            # scales are never below this (the per-layer scales_clamped counts those raised)
            "scale_floor": {"float16": SCALE_FLOOR["float16"], "float32": SCALE_FLOOR["float32"]},
            "embedding": q.embedding_precision,
            "lm_head": q.lm_head_precision,
            "smoothquant_alpha": q.alpha,
            "clip_search": q.uses_clip_search,
            "gate": q.gate,
            "layers": self.layers,
        }


@dataclass
class QuantizedGraph:
    model: onnx.ModelProto
    precision: str
    flavour: str
    domains: list[str]
    quantization: dict[str, Any] | None
    calibration: Calibration | None
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    ort_session_config: dict[str, str] = field(default_factory=dict)
    activation_dtype: str = "float32"
    kv_dtype: str = "float32"  # the KV pools' and new_kv's


def build_quantized(ckpt: Checkpoint, qcfg: QuantConfig, calibration: Calibration | None = None,
                    progress: Callable[[int], None] | None = None,
                    show_progress: bool = False) -> QuantizedGraph:
    """Calibrate if the configuration needs it (unless a Calibration is passed in, e.g. shared
    between several exports of one checkpoint), then build the graph."""
    if qcfg.needs_calibration() and calibration is None:
        from tqdm import tqdm

        cc = qcfg.calib_config()
        with tqdm(total=cc.samples, desc="calibrate", unit="sample",
                  disable=not show_progress) as bar:
            calibration = calibrate(ckpt, cc, progress=bar.update)
    if calibration is not None and qcfg.resolved_method == "gptq" and any(
            s.hessian is None for s in calibration.stats.values()):
        raise ValueError("GPTQ needs a calibration with Hessians")
    builder = QuantizedGraphBuilder(ckpt, qcfg, calibration if qcfg.needs_calibration()
                                    else None, progress)
    model = builder.build()
    domains = sorted(builder.opsets)
    assert builder.opsets[""] == (CPU_OPSET if qcfg.graph_flavour == "cpu" else OPSET)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return QuantizedGraph(model, qcfg.precision, qcfg.graph_flavour, domains,
                          None if qcfg.is_plain_fp32 else builder.manifest(),
                          calibration if qcfg.needs_calibration() else None, builder.quantized,
                          dict(PORTABLE_ORT_CONFIG) if qdq else {}, builder.dtype,
                          builder.kv_dtype)
