"""Will this bundle fit this board, and with how big a pool? The pre-flight arithmetic behind
`edgert plan`, `serve --device` and `--kv-memory auto`, in one place so the report a person
reads and the pool the service allocates cannot disagree. Every line says where its number
comes from (the bundle, the device profile, a measurement, an estimate): a board that is
OOM-killed months later is worse than a refusal now."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from devices import DeviceProfile
from edgert.core.shapes import Shape, ShapeMenu
from edgert.model_config import ModelConfig

MiB = 1 << 20
DTYPE_BYTES = {"float32": 4, "float16": 2}
# Bytes per parameter of each precision's weights, scales included (int8: per-channel fp32
# scales; int4: g32 fp16 scales, embedding kept int8). Used only to say which precision WOULD fit.
PARAM_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5625}
FITS, SMALLER_POOL, NO_FIT = "fits", "fits with a smaller pool", "does not fit"


@dataclass(frozen=True)
class Line:
    what: str
    bytes: int
    source: str  # "bundle", "profile", "measured ...", "estimate ...", "requested", "plan"


@dataclass(frozen=True)
class FitPlan:
    device: str
    precision: str
    memory_bytes: int
    memory_source: str
    lines: tuple[Line, ...]  # what comes out of memory_bytes before the pool
    pool_bytes: int
    num_blocks: int  # including the null block; 0 when nothing fits
    block_size: int
    context: int  # N: tokens per sequence the report is about
    concurrency: int  # C: sequences of N tokens wanted at once
    verdict: str
    reasons: tuple[str, ...] = ()
    build_peak: Line | None = None  # TensorRT engine build (service stopped), boards with TRT
    suggestion: str | None = None  # the precision that would fit, when this one does not
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tokens(self) -> int:
        return max(self.num_blocks - 1, 0) * self.block_size

    @property
    def seqs_at_context(self) -> int:
        return max(self.num_blocks - 1, 0) // math.ceil(self.context / self.block_size)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tokens=self.tokens, seqs_at_context=self.seqs_at_context)
        return d


def param_count(cfg: ModelConfig) -> int:
    """Parameters of a Llama-family decoder, from its shape alone."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    layer = attn + 3 * h * cfg.intermediate_size + 2 * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + cfg.num_layers * layer + h + head


def estimate_activations(cfg: ModelConfig, shapes: list[Shape], block_size: int,
                         act_bytes: int) -> int:
    """The largest call's live tensors: one layer's gathered past with the new K/V scattered
    in (two copies), its float32 scores and softmax, the MLP's widest rows, every layer's
    `new_kv` and the float32 logits. An estimate: TensorRT reports its own only after a build."""
    best = 0
    for s, t, b in shapes:
        keys = b * block_size
        past = 4 * s * cfg.num_kv_heads * keys * cfg.head_dim * act_bytes
        scores = 2 * s * cfg.num_heads * t * keys * 4
        rows = s * t * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) * act_bytes
        new_kv = cfg.num_layers * 2 * s * t * cfg.num_kv_heads * cfg.head_dim * act_bytes
        logits = s * cfg.vocab_size * 4
        best = max(best, past + scores + rows + new_kv + logits)
    return best


def largest_shapes(menu: ShapeMenu, n: int = 6) -> list[Shape]:
    """Where activations peak: the menu's most expensive calls (it lists them first), which
    are prefill chunks, and its decodes with the most keys to gather."""
    shapes = menu.all()
    decodes = sorted((x for x in shapes if x[1] == 1), key=lambda x: -x[0] * x[2])
    return list(dict.fromkeys(shapes[:n] + decodes[:3]))


def plan_fit(profile: DeviceProfile, cfg: ModelConfig, *, precision: str, weights_bytes: int,
             kv_dtype: str, block_size: int, activations: Line, context: int, concurrency: int,
             memory_bytes: int | None = None, kv_request: int | None = None,
             fraction: float = 0.9) -> FitPlan:
    """The plan for one board. `memory_bytes` overrides the profile's (a CPU host: this machine's
    available memory). `kv_request`: a pool size asked for; None sizes it from what is left
    (`fraction` of it, the rest headroom for the allocator's fragmentation)."""
    memory = memory_bytes if memory_bytes is not None else profile.memory_bytes
    if memory is None:
        raise ValueError(f"{profile.name}: memory is this machine's; pass memory_bytes")
    mem_src = "profile" if memory_bytes is None else "this machine (MemAvailable)"
    on_trt = profile.kind != "cpu"
    wsrc = ("bundle (the engine's: estimate)" if on_trt else "measured (the loaded session)"
            if weights_bytes > 0 and activations.source.startswith("measured") else "bundle")
    lines = [Line("weights", weights_bytes, wsrc), activations]
    if profile.cuda_context_bytes:
        lines.append(Line("CUDA context", profile.cuda_context_bytes, _src(profile,
                                                                        "cuda_context_bytes")))
    if profile.memory_shared or profile.kind == "cpu":
        lines.append(Line("OS reserve", profile.os_reserve_bytes,
                          _src(profile, "os_reserve_bytes")))
    used = sum(x.bytes for x in lines)
    free = max(memory - used, 0)
    block_bytes = cfg.kv_bytes_per_token(DTYPE_BYTES[kv_dtype]) * block_size
    need_blocks = 1 + concurrency * math.ceil(context / block_size)
    one_seq = (1 + math.ceil(context / block_size)) * block_bytes
    reasons: list[str] = []
    pool = int(free * fraction) if kv_request is None else kv_request
    blocks = pool // block_bytes
    if free < one_seq:
        verdict = NO_FIT
        reasons.append(f"{_mib(used)} of {_mib(memory)} go before the pool, leaving "
                       f"{_mib(free)}: one sequence of {context} tokens needs {_mib(one_seq)}")
        pool, blocks = 0, 0
    elif pool > free:
        verdict = SMALLER_POOL
        reasons.append(f"the requested pool of {_mib(pool)} exceeds the {_mib(free)} left")
        pool = int(free * fraction)
        blocks = pool // block_bytes
    elif blocks < need_blocks:
        verdict = SMALLER_POOL
        held = (blocks - 1) // math.ceil(context / block_size)
        reasons.append(f"{concurrency} sequences of {context} tokens need "
                       f"{_mib(need_blocks * block_bytes)} of pool; {_mib(pool)} holds {held}")
    else:
        verdict = FITS
    build = None
    notes: list[str] = []
    if on_trt:
        if profile.tensorrt:
            # The parser's copy of the weights, the builder's, the workspace and the plan it
            # writes, with the service stopped: an estimate until a build on the board says.
            peak = 3 * weights_bytes + profile.trt_workspace_bytes + profile.cuda_context_bytes + (
                profile.os_reserve_bytes if profile.memory_shared else 0)
            build = Line("engine build peak", peak, "estimate (3x weights + workspace + context)")
            if peak > memory:
                notes.append(f"an engine build needs about {_mib(peak)}: lower "
                               "trt_workspace_bytes or build for a smaller precision")
        else:
            notes.append(f"TensorRT {profile.software.tensorrt or 'absent'} here: edgert builds "
                         "engines with TensorRT 10 or later only (ONNX Runtime's providers remain)")
    if precision not in profile.precisions:
        notes.append(f"{precision} is not among {profile.name}'s precisions "
                     f"({', '.join(profile.precisions)})")
    suggestion = None
    if verdict == NO_FIT:
        suggestion = _would_fit(profile, cfg, memory, used - weights_bytes, one_seq, precision)
    return FitPlan(profile.name, precision, memory, mem_src, tuple(lines), pool,
                   blocks if blocks >= 2 else 0, block_size, context, concurrency, verdict,
                   tuple(reasons), build, suggestion, tuple(notes))


def _would_fit(profile: DeviceProfile, cfg: ModelConfig, memory: int, others: int, one_seq: int,
               current: str) -> str | None:
    params = param_count(cfg)
    order = sorted(PARAM_BYTES, key=PARAM_BYTES.get, reverse=True)
    for p in order:
        if PARAM_BYTES[p] >= PARAM_BYTES.get(current, 4.0) or p not in profile.precisions:
            continue
        if int(params * PARAM_BYTES[p]) + others + one_seq <= memory:
            return p
    return None


def _src(profile: DeviceProfile, name: str) -> str:
    return "profile (estimate)" if name in profile.estimates else "profile"


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def render(plan: FitPlan) -> str:
    """The report a person reads before putting a model on a board."""
    w = max(len(x.what) for x in plan.lines) + 4
    out = [f"{plan.device}: {plan.precision} bundle, {plan.concurrency} x {plan.context} tokens",
           f"  {'memory':<{w}}{_mib(plan.memory_bytes):>12}  {plan.memory_source}"]
    out += [f"  {'- ' + x.what:<{w}}{_mib(x.bytes):>12}  {x.source}" for x in plan.lines]
    out.append(f"  {'- KV pool':<{w}}{_mib(plan.pool_bytes):>12}  plan: {plan.num_blocks} "
               f"blocks of {plan.block_size} tokens, {plan.tokens:,} tokens, "
               f"{plan.seqs_at_context} sequences of {plan.context}")
    if plan.build_peak:
        b = plan.build_peak
        out.append(f"  {b.what:<{w}}{_mib(b.bytes):>12}  {b.source}"[:w + 80])
    out.append(f"verdict: {plan.verdict.upper()}" + (f" ({'; '.join(plan.reasons)})"
                                                      if plan.reasons else ""))
    if plan.suggestion:
        out.append(f"  a {plan.suggestion} bundle would fit: edgert export ... --precision "
                   f"{plan.suggestion}")
    elif plan.verdict == NO_FIT:
        out.append("  no precision this board runs would fit; pick a smaller model")
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)
