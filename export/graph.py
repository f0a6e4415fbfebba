"""The paged-KV decoder graph (shared/DESIGN.md, "The paged-KV calling convention").

Built node by node with `onnx.helper` rather than traced from torch: every op is chosen so the
graph stays in the standard domain, takes every shape from an input's shape, and reads each KV pool
through exactly one GatherND. One graph serves prefill chunks and decode steps (dynamic S, T, B).

Attention: each layer gathers the blocks of every sequence's table, heads first, places the step's
own new K/V among them at their absolute positions (ScatterND into the gathered copy), and runs
one row-wise Softmax over all keys between two GEMMs. Every key then sits where it sits in any
other call, which is what makes answers bit-identical whatever the batch. Nothing the size of the
past is ever concatenated, and the only new K/V that leave the graph are this step's. The block
size is not baked in: the pool's third axis carries it.

Activations are float32 or float16 (`dtype`). A float16 graph is float16 end to end (weights,
activations, the KV pools and `new_kv`), what a strongly typed TensorRT network builds as written,
with float32 islands where float16 loses too much: RMSNorm's mean of squares and normalisation
(cast back before the weight, as transformers does), the masked attention scores and their
Softmax, and the RoPE tables (computed in float32, then cast). Logits leave as float32. The mask
value lives in the float32 island; every float16 constant is checked to be finite.

The KV pools (and `new_kv`) are the activation dtype unless `kv_dtype` says float16 in a float32
graph: half the pool's bytes, the graph still computing in float32. The step's new K/V are then
rounded to float16 BEFORE they join the past, so every key a query sees went through the same
rounding whether it came from the pool or from this very call: a chunked prefill stays
bit-identical to a whole one, and the pool stores exactly what the step attended to. The gathered
float16 blocks (the new K/V scattered in) are widened to float32 once, for the GEMMs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgert.model_config import ModelConfig
from export.checkpoint import Checkpoint

OPSET = 21
# The cpu flavour's opset: TensorScatter (24) writes the step's K/V into the gathered past in
# place, where ScatterND copies the whole gathered past first (TensorRT 10 reads opsets <= 21,
# so the portable graph keeps ScatterND)
CPU_OPSET = 24
IR_VERSION = 10
# Masked scores: a large finite negative through `Where`, never -inf: a row whose keys are all
# masked (a padded query row) then yields finite garbage instead of NaN.
MASK_VALUE = -1.0e30
DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
# What a float16 graph computes in float32 (recorded in the manifest).
FLOAT32_ISLANDS = ("rms_norm", "attention_scores_softmax", "rope_tables")  # logits: float32


@dataclass(frozen=True)
class GraphIO:
    """Graph input/output names; written to the manifest so the runtime never guesses them."""

    input_ids: str = "input_ids"
    positions: str = "positions"
    query_lens: str = "query_lens"
    context_lens: str = "context_lens"
    block_tables: str = "block_tables"
    logits_indices: str = "logits_indices"
    logits: str = "logits"
    new_kv: str = "new_kv"

    @staticmethod
    def pool_key(layer: int) -> str:
        return f"kv_pool.{layer}.key"

    @staticmethod
    def pool_value(layer: int) -> str:
        return f"kv_pool.{layer}.value"


IO = GraphIO()


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray | float | int | list, name: str | None = None,
              dtype: type | np.dtype | None = None) -> str:
        with np.errstate(over="ignore"):  # refused below rather than warned about
            arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = name or self._name("const")
        if arr.dtype == np.float16 and not np.isfinite(arr).all():
            raise ValueError(f"{name}: a value overflows float16 (|x| > 65504)")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None,
           **attrs) -> str | list[str]:
        base = name or self._name(op_type.lower())
        outs = [base] if outputs == 1 else [f"{base}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs[0] if outputs == 1 else outs

    def fold_scale_chains(self, keep: set[str]) -> int:
        """Mul(Mul(a, C1), C2) with constant C1, C2 -> Mul(a, C1 * C2) when the inner product
        feeds nothing else (and is not in `keep`, the graph outputs). An RMSNorm's weight
        followed by SmoothQuant's 1/s becomes one weight that ORT's fused norm takes in: each
        Mul left costs about 10 us at decode whatever its size (measured: 120 fewer Muls made a
        SmolLM2 int8 step 0.91x as long). Returns the number folded."""
        consts = {t.name: t for t in self.initializers}
        made = {o: n for n in self.nodes for o in n.output}
        uses = collections.Counter(i for n in self.nodes for i in n.input)

        def split(n: onnx.NodeProto) -> tuple[str, str] | None:  # (tensor, constant)
            if n.op_type != "Mul" or len(n.input) != 2:
                return None
            a, c = n.input
            if a in consts:
                a, c = c, a
            return (a, c) if c in consts and a not in consts else None

        dropped: set[int] = set()
        for n in self.nodes:
            outer = split(n)
            inner_node = made.get(outer[0]) if outer else None
            inner = split(inner_node) if inner_node is not None else None
            if not inner or uses[outer[0]] != 1 or outer[0] in keep:
                continue
            c1, c2 = (numpy_helper.to_array(consts[c]) for c in (inner[1], outer[1]))
            if c1.dtype != c2.dtype:
                continue
            name = self.const((c1 * c2).astype(c1.dtype), self._name(inner[1] + ".scaled"))
            consts[name] = self.initializers[-1]
            n.input[:] = [inner[0], name]
            made.update({o: n for o in n.output})
            dropped.add(id(inner_node))
        self.nodes = [n for n in self.nodes if id(n) not in dropped]
        return len(dropped)

    def fuse_skip_norms(self, keep: set[str]) -> int:
        """Add(a, b) followed by the RMSNorm `rms_norm` spells (Pow, ReduceMean, Add eps,
        Sqrt, Div, Mul by a constant weight) -> one com.microsoft SkipSimplifiedLayerNormalization,
        whose fourth output is the sum the residual stream goes on with. ORT fuses the norm
        alone but not the Add before it: 59 kernels of SmolLM2's step. Returns the number fused."""
        made = {o: n for n in self.nodes for o in n.output}
        users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                users[i].append(n)
        consts = {t.name: t for t in self.initializers}

        def only(x: str, op: str) -> onnx.NodeProto | None:
            us = users.get(x, [])
            return us[0] if len(us) == 1 and us[0].op_type == op and x not in keep else None

        dropped: set[int] = set()
        fused = 0
        for pow_ in [n for n in self.nodes if n.op_type == "Pow"]:
            add = made.get(pow_.input[0])
            if add is None or add.op_type != "Add" or any(i in consts for i in add.input):
                continue
            mean = only(pow_.output[0], "ReduceMean")
            eps = mean and only(mean.output[0], "Add")
            sqrt = eps and only(eps.output[0], "Sqrt")
            div = sqrt and only(sqrt.output[0], "Div")
            mul = div and only(div.output[0], "Mul")
            if (not mul or div.input[0] != add.output[0] or mul.input[1] not in consts
                    or eps.input[1] not in consts):
                continue
            epsilon = float(numpy_helper.to_array(consts[eps.input[1]]))
            dropped.update(id(n) for n in (add, pow_, mean, eps, sqrt, div))
            # in the Mul's place: after both inputs of the Add, before every user of its sum
            self.nodes[self.nodes.index(mul)] = helper.make_node(
                "SkipSimplifiedLayerNormalization", [*add.input, mul.input[1]],
                [mul.output[0], "", "", add.output[0]], name=self._name("skip_norm"),
                domain="com.microsoft", epsilon=epsilon)
            fused += 1
        self.nodes = [n for n in self.nodes if id(n) not in dropped]
        return fused

    def drop_unread_constants(self) -> int:
        """Initializers no node reads any more: the constants of the nodes a rewrite above
        replaced (each fused norm leaves its Pow exponent and its epsilon). ORT logs a warning
        for every one at every session start: 148 lines in a SmolLM2 int8 server's journal
        each time it starts. Returns the number dropped."""
        read = {i for n in self.nodes for i in n.input}
        kept = [t for t in self.initializers if t.name in read]
        dropped, self.initializers = len(self.initializers) - len(kept), kept
        return dropped


class DecoderGraphBuilder:
    """Emits the decoder for one checkpoint. `linear` is the hook quantization overrides: it
    receives the float weight [in, out] and returns the output name of x @ W."""

    # Constant scales merged into the weights before them (_Builder.fold_scale_chains and the
    # quantizer's down_proj smoothing), in float32 graphs: False only to see what folding
    # changes. A float16 graph keeps its Muls: the portable int8 gate (W8A8, static scales)
    # measured +2.45% with both folds and +2.74% with the norms' alone, against +2.09% unfolded.
    fold_scales = True

    def __init__(self, ckpt: Checkpoint, progress: Callable[[int], None] | None = None,
                 dtype: str = "float32", kv_dtype: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"activation dtype must be one of {sorted(DTYPES)}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in DTYPES:
            raise ValueError(f"KV dtype must be one of {sorted(DTYPES)}")
        if dtype == "float16" and kv_dtype != "float16":
            raise ValueError("a float16 graph keeps a float16 KV pool (a float32 pool would "
                             "only store float16 values in twice the bytes)")
        self.ckpt = ckpt
        self.cfg: ModelConfig = ckpt.config
        self.dtype = dtype  # activations and the weights of the float layers
        self.act = DTYPES[dtype]
        self.np_act = np.dtype(dtype)
        self.float16 = dtype == "float16"
        self.kv_dtype = kv_dtype  # the pools' and new_kv's
        self.kv = DTYPES[kv_dtype]
        # The LM head's output in the activation dtype, and as float32 (a float16 graph casts
        # one to the other); a logit soft-cap then maps the float32 one to IO.logits.
        self.logits_f32 = IO.logits if self.cfg.final_logit_softcap is None else "logits_uncapped"
        self.logits_out = self.logits_f32 if not self.float16 else "logits_float16"
        self.b = _Builder()
        # Operator domains the graph imports; a quantizing subclass adds com.microsoft.
        self.opsets: dict[str, int] = {"": OPSET}
        # The step's K/V join the gathered past through ScatterND (portable) or in place
        # through TensorScatter (set with opset CPU_OPSET by the cpu flavour)
        self.in_place_kv = False
        # RoPE as one RotaryEmbedding (opset 23) per layer instead of eight elementwise kernels
        # (set with opset CPU_OPSET by the cpu flavour: TensorRT 10 reads opsets <= 21)
        self.fused_rope = False
        # Each residual Add and the RMSNorm after it as one SkipSimplifiedLayerNormalization
        # (com.microsoft; set by the cpu flavour)
        self.skip_norms = False
        self._progress = progress or (lambda _n: None)
        self._axis_last = self.b.const(np.array([-1], np.int64), "axes_last")

    # ---- building blocks -------------------------------------------------------------------
    def cast(self, x: str, to: int) -> str:
        return self.b.op("Cast", x, to=to)

    def linear(self, x: str, weight_t: np.ndarray, name: str) -> str:
        """x @ W with W given as [in, out]."""
        w = self.b.const(np.ascontiguousarray(weight_t), name, dtype=self.np_act)
        return self.b.op("MatMul", x, w)

    def embedding(self, ids: str) -> str:
        """Token ids [S, T] -> hidden states [S, T, hidden]; a quantization hook like `linear`."""
        w = self.ckpt.weight
        return self.b.op("Gather", self.b.const(w("model.embed_tokens.weight"),
                                                "model.embed_tokens.weight", self.np_act),
                         ids, axis=0)

    def scale_embedding(self, x: str) -> str:
        """Gemma's sqrt(hidden) on the embeddings: a Mul after the lookup rather than folded
        into the table, because the LM head shares that table."""
        m = self.cfg.embedding_multiplier
        return x if m == 1.0 else self.b.op("Mul", x, self.b.const(np.array(m, self.np_act)))

    def softcap(self, x: str, cap: float | None, name: str | None = None) -> str:
        """cap * tanh(x / cap), Gemma 2's bound on attention scores and logits."""
        if cap is None:
            return x
        c = self.b.const(np.array(cap, np.float32))
        return self.b.op("Mul", self.b.op("Tanh", self.b.op("Div", x, c)), c, name=name)

    def lm_head(self, rows: str) -> str:
        """Final-norm rows [N, hidden] -> logits [N, vocab], output under `logits_out` (a float16
        graph's `build` casts that to the float32 IO.logits)."""
        b, w = self.b, self.ckpt.weight
        if self.cfg.tie_word_embeddings:
            head = "model.embed_tokens.weight"  # shared with the embedding Gather: stored once
        else:
            head = b.const(w("lm_head.weight"), "lm_head.weight", self.np_act)
        return b.op("Gemm", rows, head, transB=1, name=self.logits_out)

    def rms_norm(self, x: str, weight: np.ndarray, name: str) -> str:
        """x * rsqrt(mean(x^2) + eps) * weight. In a float16 graph the mean of squares and the
        normalisation run in float32 (a float16 x^2 overflows from |x| > 256 and its mean loses
        digits), cast back to float16 before the weight, as transformers computes it."""
        b = self.b
        w = b.const(weight, name, self.np_act)
        eps = b.const(np.array(self.cfg.rms_norm_eps, np.float32))
        if self.float16:
            x = self.cast(x, TensorProto.FLOAT)
        # Spelled Pow -> ReduceMean -> Add -> Sqrt -> Div, the pattern ONNX Runtime fuses into
        # one SimplifiedLayerNormalization kernel (x*x and a Reciprocal are not matched: 7
        # kernels per norm instead of 1, 61 norms per SmolLM2 step); still standard ONNX.
        two = b.const(np.array(2.0, np.float32))
        var = b.op("ReduceMean", b.op("Pow", x, two), self._axis_last, keepdims=1)
        y = b.op("Div", x, b.op("Sqrt", b.op("Add", var, eps)))
        if self.float16:
            y = self.cast(y, self.act)
        return b.op("Mul", y, w)

    def rope(self, x: str, cos: str, sin: str, fused: bool = False) -> str:
        """HF rotate-half RoPE on x [S, T, heads, d] with cos/sin [S, T, 1, r/2]: the first r
        dims rotate (r = d but for a partial rotary factor), the rest pass through. Fused (one
        RotaryEmbedding), x is heads first [S, heads, T, d] and cos/sin [S, T, r/2]."""
        b = self.b
        r, d = self.cfg.rope_dims, self.cfg.head_dim
        if fused:
            return b.op("RotaryEmbedding", x, cos, sin,
                        **({"rotary_embedding_dim": r} if r < d else {}))
        if r < d:
            x1, x2, rest = b.op("Split", x, b.const(np.array([r // 2, r // 2, d - r], np.int64)),
                                axis=-1, outputs=3)
        else:
            x1, x2 = b.op("Split", x, axis=-1, num_outputs=2, outputs=2)
        r1 = b.op("Sub", b.op("Mul", x1, cos), b.op("Mul", x2, sin))
        r2 = b.op("Add", b.op("Mul", x2, cos), b.op("Mul", x1, sin))
        return b.op("Concat", r1, r2, *([rest] if r < d else []), axis=-1)

    # ---- the graph -------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        cfg, b, w = self.cfg, self.b, self.ckpt.weight
        i32 = TensorProto.INT32
        kvh, d = cfg.num_kv_heads, cfg.head_dim

        inputs = [
            helper.make_tensor_value_info(IO.input_ids, i32, ["S", "T"]),
            helper.make_tensor_value_info(IO.positions, i32, ["S", "T"]),
            helper.make_tensor_value_info(IO.query_lens, i32, ["S"]),
            helper.make_tensor_value_info(IO.context_lens, i32, ["S"]),
            helper.make_tensor_value_info(IO.block_tables, i32, ["S", "B"]),
            helper.make_tensor_value_info(IO.logits_indices, i32, ["N"]),
        ]
        for layer in range(cfg.num_layers):
            for pool in (IO.pool_key(layer), IO.pool_value(layer)):
                inputs.append(helper.make_tensor_value_info(
                    pool, self.kv, ["num_blocks", kvh, "block_size", d]))

        x = self.scale_embedding(self.embedding(IO.input_ids))

        cos, sin = self._rope_tables()
        if self.fused_rope:  # RotaryEmbedding's cos/sin: [S, T, r/2], one row per token
            two = b.const(np.array([2], np.int64))
            cos, sin = b.op("Squeeze", cos, two), b.op("Squeeze", sin, two)
        elif not cfg.qk_norm:
            # cos/sin over the fused q, k, v heads [S, T, heads, d/2]: v's heads get cos 1 and
            # sin 0, which leave them exactly as they are (x*1 - y*0 = x), so one RoPE serves
            # the whole QKV projection.
            rot = np.array([1] * (cfg.num_heads + kvh) + [0] * kvh, self.np_act).reshape(
                1, 1, -1, 1)
            keep = b.const(rot, "rope.rotated_heads")
            cos_h = b.op("Add", b.op("Mul", cos, keep), b.const(1 - rot, "rope.kept_heads"))
            self._qkv_rope = (cos_h, b.op("Mul", sin, keep))
        masks = self._masks()
        new_kv = []
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}."
            h = self.rms_norm(x, w(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            attn, k_new, v_new = self._attention(layer, h, cos, sin, masks)
            if cfg.sandwich_norms:
                attn = self.rms_norm(attn, w(p + "attn_output_norm.weight"),
                                     p + "attn_output_norm.weight")
            x = b.op("Add", x, attn)
            h = self.rms_norm(x, w(p + "post_attention_layernorm.weight"),
                              p + "post_attention_layernorm.weight")
            mlp = self._mlp(layer, h)
            if cfg.sandwich_norms:
                mlp = self.rms_norm(mlp, w(p + "mlp_output_norm.weight"),
                                    p + "mlp_output_norm.weight")
            x = b.op("Add", x, mlp)
            new_kv += [k_new, v_new]
            self._progress(1)

        # Every layer's [S, T, kvh, d] K and V -> [layers, 2, S, T, kvh, d] in three kernels:
        # concatenated along the heads, then moved to the front (a copy of the step's own K/V
        # only). Unsqueezing each and concatenating per layer took 91 (about 10 us each at
        # decode, whatever their size). Heads first, they are [S, kvh, T, d].
        layers = cfg.num_layers
        if self.fused_rope:  # [S, layers * 2 * kvh, T, d]
            axis, dims, perm = 1, [0, layers, 2, kvh, -1, d], [1, 2, 0, 4, 3, 5]
        else:  # [S, T, layers * 2 * kvh, d]
            axis, dims, perm = 2, [0, 0, layers, 2, kvh, d], [2, 3, 0, 1, 4, 5]
        stacked = b.op("Reshape", b.op("Concat", *new_kv, axis=axis),
                       b.const(np.array(dims, np.int64)))
        b.op("Transpose", stacked, perm=perm, name=IO.new_kv)

        # Only the rows named by logits_indices reach the final norm and the LM head.
        flat = b.op("Reshape", x, b.const(np.array([-1, cfg.hidden_size], np.int64)))
        rows = b.op("Gather", flat, IO.logits_indices, axis=0)
        rows = self.rms_norm(rows, w("model.norm.weight"), "model.norm.weight")
        head = self.lm_head(rows)
        if head not in (IO.logits, self.logits_f32):  # float16 logits: the sampler reads float32
            head = b.op("Cast", head, to=TensorProto.FLOAT, name=self.logits_f32)
        if head != IO.logits:
            self.softcap(head, cfg.final_logit_softcap, name=IO.logits)

        outputs = [
            helper.make_tensor_value_info(IO.logits, TensorProto.FLOAT, ["N", cfg.vocab_size]),
            helper.make_tensor_value_info(IO.new_kv, self.kv,
                                          [cfg.num_layers, 2, "S", "T", kvh, d]),
        ]
        if self.fold_scales and not self.float16:
            b.fold_scale_chains({o.name for o in outputs})
        if self.skip_norms and b.fuse_skip_norms({o.name for o in outputs}):
            self.opsets.setdefault("com.microsoft", 1)
        b.drop_unread_constants()
        graph = helper.make_graph(b.nodes, "edgert_paged_decoder", inputs, outputs,
                                  initializer=b.initializers, value_info=b.value_info)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
            producer_name="edgert-export")
        model.ir_version = IR_VERSION
        return model

    def _rope_tables(self) -> tuple[str, str]:
        """cos/sin [S, T, 1, d/2] from positions; inv_freq computed as transformers does (fp32).
        Always computed in float32 (a float16 position * frequency loses the angle beyond
        position 2048), then cast to the activation dtype."""
        b = self.b
        inv_freq = rope_inv_freq(self.cfg)
        pos = b.op("Cast", IO.positions, to=TensorProto.FLOAT)
        pos = b.op("Unsqueeze", pos, b.const(np.array([-1], np.int64)))  # [S, T, 1]
        freqs = b.op("Mul", pos, b.const(inv_freq, "rope.inv_freq"))  # [S, T, d/2]
        freqs = b.op("Unsqueeze", freqs, b.const(np.array([2], np.int64)))  # [S, T, 1, d/2]
        cos, sin = b.op("Cos", freqs), b.op("Sin", freqs)
        factor = (self.cfg.rope_scaling or {}).get("attention_factor", 1.0)
        if factor != 1.0:  # LongRoPE scales the rotation (both q and k)
            f = b.const(np.array(factor, np.float32))
            cos, sin = b.op("Mul", cos, f), b.op("Mul", sin, f)
        if self.float16:
            cos, sin = self.cast(cos, self.act), self.cast(sin, self.act)
        return cos, sin

    def _masks(self) -> tuple[str, str]:
        """The int32 constants 0 and 1 that the index arithmetic of every layer shares."""
        b = self.b
        return (b.const(np.array(0, np.int32), "i32_zero"),
                b.const(np.array(1, np.int32), "i32_one"))

    def _block_heads(self, zero: str) -> str:
        """GatherND indices [S, kvh, B, 2] = (block_tables[s, b], h): every kv head's slice of
        every block in the table, so the gathered past comes out heads-first."""
        b = self.b
        kvh = self.cfg.num_kv_heads
        table = b.op("Unsqueeze", IO.block_tables, b.const(np.array([1], np.int64)))  # [S,1,B]
        heads = b.const(np.arange(kvh, dtype=np.int32).reshape(1, kvh, 1))
        ax = b.const(np.array([-1], np.int64))
        table = b.op("Add", table, b.op("Mul", heads, zero))  # [S, kvh, B]
        heads = b.op("Add", heads, b.op("Mul", table, zero))  # [S, kvh, B]
        idx = b.op("Concat", b.op("Unsqueeze", table, ax), b.op("Unsqueeze", heads, ax), axis=-1)
        return b.op("Cast", idx, to=TensorProto.INT64)

    def _key_positions(self, blocks: str, zero: str, one: str) -> tuple[str | None, str]:
        """Where the new tokens go among the gathered keys, and which keys each query sees.

        Token t of sequence s is at position p = context_len[s] + t, i.e. in block column
        p // block_size at offset p % block_size of the gathered [S, kvh, B, block_size, d]:
        ScatterND indices [S, kvh, T, 4] = (s, h, p // block_size, p % block_size), int64 as
        ONNX requires (None when TensorScatter places them: `blocks` is then the placed
        [S, kvh, P, d]). Query t sees keys j <= p (causal; everything older is its past): a mask
        [S, 1, g*T, P] over the stacked query heads, P = B * block_size. The block table
        covers the new tokens' slots."""
        b = self.b
        i32 = TensorProto.INT32
        kvh = self.cfg.num_kv_heads

        def dim(x: str, i: int) -> str:
            return b.op("Squeeze", b.op("Cast", b.op("Shape", x, start=i, end=i + 1), to=i32))

        s_len, t_len = dim(IO.input_ids, 0), dim(IO.input_ids, 1)
        if self.in_place_kv:  # `blocks` is layer 0's placed keys [S, kvh, P, d]: read after
            # the TensorScatter, as a second reader before it would make it copy
            bs, p_len = None, dim(blocks, 2)
        else:
            bs = dim(blocks, 3)
            p_len = b.op("Mul", dim(blocks, 2), bs)
        ctx = b.op("Unsqueeze", IO.context_lens, b.const(np.array([1], np.int64)))  # [S, 1]
        ti = b.op("Unsqueeze", b.op("Range", zero, t_len, one),
                  b.const(np.array([0], np.int64)))  # [1, T]
        at = b.op("Add", ctx, ti)  # [S, T]: each new token's position
        si = b.op("Unsqueeze", b.op("Range", zero, s_len, one),
                  b.const(np.array([1], np.int64)))  # [S, 1]
        # every component broadcast to [S, kvh, T]
        ax1 = b.const(np.array([1], np.int64))
        at3 = b.op("Unsqueeze", at, ax1)  # [S, 1, T]
        like = b.op("Mul", b.op("Add", at3, b.op("Mul", b.const(
            np.zeros((1, kvh, 1), np.int32)), zero)), zero)  # zeros [S, kvh, T]
        ax = b.const(np.array([-1], np.int64))
        idx = None
        if bs is not None:  # ScatterND's indices; TensorScatter takes context_lens instead
            parts = [b.op("Add", b.op("Unsqueeze", si, ax1), like),
                     b.op("Add", b.const(np.arange(kvh, dtype=np.int32).reshape(1, kvh, 1)),
                          like),
                     b.op("Add", b.op("Div", at3, bs), like),
                     b.op("Add", b.op("Mod", at3, bs), like)]
            idx = b.op("Concat", *(b.op("Unsqueeze", x, ax) for x in parts), axis=-1)
            idx = b.op("Cast", idx, to=TensorProto.INT64)  # [S, kvh, T, 4]
        pj = b.op("Range", zero, p_len, one)  # [P]
        at_p = b.op("Unsqueeze", at, ax)  # [S, T, 1]
        causal = b.op("LessOrEqual", pj, at_p)  # [S, T, P]
        window = self.cfg.sliding_window
        if window is not None and self.cfg.sliding_window_layers:
            # a sliding-window layer's query at p sees keys in (p - window, p]: the same
            # gathered past and the same sums, fewer keys unmasked
            recent = b.op("Greater", pj, b.op("Sub", at_p, b.const(np.array(window, np.int32))))
            self._window_mask = self._stacked_rows(b.op("And", causal, recent))
        return idx, self._stacked_rows(causal)

    def _stacked_rows(self, mask: str) -> str:
        """A [S, T, P] key mask -> [S, 1, g*T (+1), P], the rows of the stacked query heads."""
        b = self.b
        mask = b.op("Unsqueeze", mask, b.const(np.array([1], np.int64)))  # [S, 1, T, P]
        g = self.cfg.group_size
        if g > 1:  # g blocks of T
            return b.op("Tile", mask, b.const(np.array([1, 1, g, 1], np.int64)))
        # the zero query row sees what query 0 sees (at least itself): its softmax stays finite
        return b.op("Concat", mask, b.op("Slice", mask, "i64_zero", "i64_one", "i64_two"), axis=2)

    def _attention(self, layer: int, h: str, cos: str, sin: str,
                   masks: tuple[str, str]) -> tuple[str, str, str]:
        cfg, b, w = self.cfg, self.b, self.ckpt.weights
        p = f"model.layers.{layer}.self_attn."
        kvh, d, nh, g = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, cfg.group_size
        zero, one = masks

        # Fused QKV projection: one GEMM instead of three, then a Split.
        wq, wk, wv = w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"]
        qkv = self.linear(h, np.concatenate([wq, wk, wv], axis=0).T, p + "qkv_proj.weight")
        if cfg.attention_bias:
            bias = np.concatenate([w[p + "q_proj.bias"], w[p + "k_proj.bias"],
                                   w[p + "v_proj.bias"]])
            qkv = b.op("Add", qkv, b.const(bias, p + "qkv_proj.bias", self.np_act))
        split = b.const(np.array([nh, kvh, kvh], np.int64))
        heads = b.const(np.array([0, 0, -1, d], np.int64))  # [S, T, heads * d] -> heads, d
        qkv = b.op("Reshape", qkv, heads)  # [S, T, heads, d]
        axis = 2
        if self.fused_rope:
            # Heads first from here on, [S, heads, T, d]: one Transpose of the projection
            # instead of one each for q, k and v (4 kernels fewer per layer); RotaryEmbedding
            # takes that layout as it is (bit-identical to its [S, T, heads * d] form)
            qkv, axis = b.op("Transpose", qkv, perm=[0, 2, 1, 3]), 1
        if cfg.qk_norm:  # per-head norms of q and k (not v) come before RoPE
            q, k, v = b.op("Split", qkv, split, axis=axis, outputs=3)
            q = self.rms_norm(q, w[p + "q_norm.weight"], p + "q_norm.weight")
            k = self.rms_norm(k, w[p + "k_norm.weight"], p + "k_norm.weight")
            q, k = (self.rope(x, cos, sin, fused=self.fused_rope) for x in (q, k))
        elif self.fused_rope:  # q and k rotated together, then split
            qk, v = b.op("Split", qkv, b.const(np.array([nh + kvh, kvh], np.int64)), axis=1,
                         outputs=2)
            q, k = b.op("Split", self.rope(qk, cos, sin, fused=True),
                        b.const(np.array([nh, kvh], np.int64)), axis=1, outputs=2)
        else:  # one RoPE over all heads, v's with the identity rotation: 8 kernels, not 16
            q, k, v = b.op("Split", self.rope(qkv, *self._qkv_rope), split, axis=2, outputs=3)
        # k [S, T, kvh, d] (rotated; [S, kvh, T, d] when heads first) and v are what goes into
        # the pool, in the pool's dtype: rounded before they join the past (module docstring),
        # returned as new_kv
        if self.kv != self.act:
            k, v = self.cast(k, self.kv), self.cast(v, self.kv)

        # Queries grouped per KV head, the g heads' rows stacked: [S, kvh, g*T, d], pre-scaled
        # by 1/sqrt(d). Stacking makes each attention GEMM at least two rows tall even when
        # decoding (T = 1): ORT's one-row GEMV sums in another order than its GEMM, so a token
        # decoded and the same token recomputed in a prefill would differ in the last bits. An
        # MHA model (g = 1) gets a zero query row for the same reason.
        if not self.fused_rope:  # [S, T, nh, d] -> [S, kvh, g, T, d]; heads first already is
            q = b.op("Reshape", q, b.const(np.array([0, 0, kvh, g, d], np.int64)))
            q = b.op("Transpose", q, perm=[0, 2, 3, 1, 4])
        q = b.op("Reshape", q, b.const(np.array([0, kvh, -1, d], np.int64)))
        scale = cfg.attention_scale if cfg.attention_scale is not None else d ** -0.5
        q = b.op("Mul", q, b.const(np.array(scale, self.np_act)))
        if g == 1:
            if layer == 0:
                for name, val in (("i64_zero", 0), ("i64_one", 1), ("i64_two", 2)):
                    b.const(np.array([val], np.int64), name)
            pad_row = b.op("Mul", b.op("Slice", q, "i64_zero", "i64_one", "i64_two"),
                           b.const(np.array(0.0, self.np_act)))
            q = b.op("Concat", q, pad_row, axis=2)  # [S, kvh, T + 1, d]

        # Past: the pool's ONLY consumer is this GatherND, which reads each (block, kv head)
        # slice [block_size, d] of the table: [S, kvh, B, bs, d], already the layout the
        # attention GEMMs want (no transpose of the past).
        if layer == 0:
            self._gather_at = self._block_heads(zero)
        k_blocks = b.op("GatherND", IO.pool_key(layer), self._gather_at)
        v_blocks = b.op("GatherND", IO.pool_value(layer), self._gather_at)
        # The step's own K/V join the gathered past at their positions (ScatterND), so every
        # key sits at its absolute position whatever the call: a token's attention sums in the
        # same order alone or batched, in one prefill or chunked, decoded or recomputed after a
        # preemption, and quantized activations never see a batch-dependent rounding (see
        # DESIGN.md, batch invariance).
        if layer == 0:
            b.const(np.array(MASK_VALUE, np.float32), "mask_value")
            if self.in_place_kv:
                self._write_at = b.op("Cast", IO.context_lens, to=TensorProto.INT64)
            else:
                self._scatter_at, self._key_mask = self._key_positions(k_blocks, zero, one)
        flat = b.const(np.array([0, 0, -1, d], np.int64))
        k_all, v_all = (self._place(blocks, self._heads_first(new), flat)
                        for blocks, new in ((k_blocks, k), (v_blocks, v)))
        if layer == 0 and self.in_place_kv:
            _, self._key_mask = self._key_positions(k_all, zero, one)
        kp = b.op("Transpose", k_all, perm=[0, 1, 3, 2])  # [S, kvh, d, P]: ORT fuses it
        vp = v_all  # [S, kvh, P, d]
        # The masked scores and their Softmax in float32 (the mask value is far beyond float16,
        # and a float16 softmax of long rows loses the small probabilities); the two GEMMs in
        # the activation dtype.
        qk = b.op("MatMul", q, kp)
        if self.float16:
            qk = self.cast(qk, TensorProto.FLOAT)
        qk = self.softcap(qk, cfg.attn_logit_softcap)
        windowed = layer in cfg.sliding_window_layers and cfg.sliding_window is not None
        scores = b.op("Where", self._window_mask if windowed else self._key_mask, qk,
                      "mask_value")
        probs = b.op("Softmax", scores, axis=-1)  # [S, kvh, g*T, P], one row-wise softmax
        if self.float16:
            probs = self.cast(probs, self.act)
        o = b.op("MatMul", probs, vp)  # [S, kvh, g*T, d]
        if g == 1:
            o = b.op("Slice", o, "i64_zero", b.op("Shape", IO.input_ids, start=1, end=2),
                     "i64_two")
        o = b.op("Reshape", o, b.const(np.array([0, 0, g, -1, d], np.int64)))  # [S,kvh,g,T,d]
        o = b.op("Transpose", o, perm=[0, 3, 1, 2, 4])  # [S, T, kvh, g, d]
        o = b.op("Reshape", o, b.const(np.array([0, 0, nh * d], np.int64)))
        out = self.linear(o, w[p + "o_proj.weight"].T, p + "o_proj.weight")
        return out, k, v

    def _heads_first(self, x: str) -> str:
        """[S, T, heads, d] -> [S, heads, T, d] (only this step's tokens); the fused-RoPE graph
        has that layout from its projection on."""
        return x if self.fused_rope else self.b.op("Transpose", x, perm=[0, 2, 1, 3])

    def _place(self, blocks: str, new: str, flat: str) -> str:
        """The gathered past [S, kvh, B, bs, d] with the step's K or V [S, kvh, T, d] at
        positions context_len .. context_len + T - 1 -> [S, kvh, P, d], in the activation
        dtype (a float16 pool is widened for the float32 GEMMs). The same values land in the
        same places either way; TensorScatter writes them into a buffer where ScatterND first
        copies it (a third of the past's traffic at long contexts)."""
        b = self.b
        widen = self.kv != self.act
        if self.in_place_kv:
            past = b.op("Reshape", blocks, flat)
            if widen:
                # widened BEFORE the write, so TensorScatter writes into the Cast's buffer. Written
                # into the GatherND's own buffer, ORT kept every layer's gathered past alive to
                # the end of the call (measured: 412 MiB of activations at S=16 over 1k tokens
                # instead of 59). The step's K/V were rounded to the pool's dtype already, so
                # the widened values are the ones the pool will hold.
                past, new = self.cast(past, self.act), self.cast(new, self.act)
            out = b.op("TensorScatter", past, new, self._write_at, axis=-2)
            # ORT writes in place only when it can see the two shapes are equal: its shape
            # inference leaves the Reshape's -1 axis unnamed, and an unnamed axis never equals
            # another (measured: every TensorScatter copied until both were named)
            dims = ["S", self.cfg.num_kv_heads, "P", self.cfg.head_dim]
            b.value_info += [helper.make_tensor_value_info(x, self.act if widen else self.kv,
                                                           dims) for x in (past, out)]
            return out
        assert self._scatter_at is not None
        out = b.op("Reshape", b.op("ScatterND", blocks, self._scatter_at, new), flat)
        return self.cast(out, self.act) if widen else out  # float16 K/V, float32 GEMMs

    def _mlp(self, layer: int, h: str) -> str:
        b, w = self.b, self.ckpt.weights
        p = f"model.layers.{layer}.mlp."
        inter = self.cfg.intermediate_size
        gate_up = self.linear(h, np.concatenate([w[p + "gate_proj.weight"],
                                                 w[p + "up_proj.weight"]], axis=0).T,
                              p + "gate_up_proj.weight")
        gate, up = b.op("Split", gate_up, b.const(np.array([inter, inter], np.int64)), axis=-1,
                        outputs=2)
        if self.cfg.hidden_act == "gelu_tanh":  # GeGLU (Gemma): ONNX's own tanh-approx Gelu
            act = b.op("Mul", b.op("Gelu", gate, approximate="tanh"), up)
        else:
            act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # SiLU(gate) * up
        return self.linear(act, w[p + "down_proj.weight"].T, p + "down_proj.weight")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [d/2], float32 arithmetic as transformers' rope init functions."""
    d = cfg.rope_dims
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "longrope":  # the short factors: the loader capped the context where they hold
        short = np.asarray(rs["short_factor"], np.float32)
        inv = (np.float32(1.0) / (short * np.float32(cfg.rope_theta) ** exponent)).astype(
            np.float32)
    elif kind == "linear":
        inv = (inv / np.float32(rs["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind != "default":
        raise ValueError(f"rope scaling type {kind!r} is not supported "
                         "(default, linear, llama3, longrope)")
    return inv


def build_decoder(ckpt: Checkpoint, progress: Callable[[int], None] | None = None,
                  dtype: str = "float32", kv_dtype: str | None = None) -> onnx.ModelProto:
    """The float graph: float32, or float16 with its float32 islands (module docstring); the KV
    pools `kv_dtype` (None: the activation dtype)."""
    return DecoderGraphBuilder(ckpt, progress, dtype, kv_dtype).build()
