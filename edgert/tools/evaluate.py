"""`edgert eval`: how much a bundle's quantization costs, measured rather than promised.

Perplexity on held-out text, and against a reference bundle (normally the fp32 export of the same
source) the top-1 agreement and mean KL divergence of the next-token distributions, plus the
bundle's size and the peak resident memory of a process generating with it.

The text is Python's own documentation (`pydoc_data.topics`, in every CPython), split by topic into
a calibration part (the exporter's, export/texts.py) and a held-out part (scored here), so no model
is ever scored on text it was calibrated on.

Windows are fed straight through the bundle's graph with a throwaway pool (context 0, one null
block), every scored position through the LM head via `logits_indices`; the engine's scheduler is
not needed to score text, and bypassing it keeps an 8k-token evaluation to the cost of the forward
passes. Scoring follows the usual strided protocol: windows of `window` tokens every `stride`
tokens, each scoring only the tokens the previous window did not, so every scored token after the
first window sees at least `window - stride` tokens of context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.bundle import PAGED, Bundle
from edgert.model_config import ModelConfig

# Topic i of the sorted pydoc topics is held out iff i % HELDOUT_EVERY == HELDOUT_SLOT: a quarter
# of the text (~34k SmolLM2 tokens), spread over the whole alphabet of topics. The exporter
# calibrates on the other three quarters (export/texts.py states the same split).
HELDOUT_EVERY = 4
HELDOUT_SLOT = 1


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics)]


def heldout_text() -> str:
    """The evaluation text: never used for calibration. A topic whose text also appears inside
    a calibration topic (pydoc repeats some, e.g. 'else' within 'if') is left out."""
    topics = _topics()
    calib = [t for i, (_, t) in enumerate(topics) if i % HELDOUT_EVERY != HELDOUT_SLOT]
    return "\n\n".join(t for i, (_, t) in enumerate(topics)
                       if i % HELDOUT_EVERY == HELDOUT_SLOT and not any(t in c for c in calib))


@dataclass(frozen=True)
class EvalConfig:
    window: int = 512
    stride: int = 256
    tokens: int = 8192  # score at least this many tokens (the last window may add a few more)
    threads: int = 0  # ORT intra-op threads; 0 = ORT's default (one per physical core)

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.window - 1:
            raise ValueError(f"stride must be in [1, window - 1], got {self.stride} / "
                             f"{self.window}")
        if self.tokens < 1:
            raise ValueError("tokens must be >= 1")


def plan_windows(num_tokens: int, cfg: EvalConfig) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: tokens [begin, end) go in and the targets
    [first_target, end) are scored, each predicted from the position before it."""
    out: list[tuple[int, int, int]] = []
    scored, prev_end, begin = 0, 0, 0
    while scored < cfg.tokens:
        end = min(begin + cfg.window, num_tokens)
        first = max(begin + 1, prev_end)
        if end <= first:
            break
        out.append((begin, end, first))
        scored += end - first
        prev_end = end
        if end == num_tokens:
            break
        begin += cfg.stride
    if scored < cfg.tokens:
        raise ValueError(f"text has {num_tokens} tokens: too few to score {cfg.tokens}")
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class GraphScorer:
    """Runs whole windows through a paged-KV graph with a pool holding only the null block: with
    context 0 nothing is read from the pool, so the pool costs nothing."""

    BLOCK = 16  # the throwaway pool's block size (its one block is never read)

    def __init__(self, session: Any, io: dict[str, Any], config: ModelConfig,
                 kv_dtype: str = "float32"):
        self.session, self.io, self.config = session, io, config
        pool = np.zeros((1, config.num_kv_heads, self.BLOCK, config.head_dim), np.dtype(kv_dtype))
        self._pools = {name: pool for pair in io["pools"] for name in pair}

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int = 0) -> GraphScorer:
        import onnxruntime as ort

        from edgert.config import BackendConfig
        from edgert.runner.ort_backend import session_options

        if bundle.convention != PAGED:
            return DenseScorer(bundle, threads)
        opts = session_options(BackendConfig(threads=threads), bundle)
        session = ort.InferenceSession(str(bundle.model_path), opts,
                                       providers=["CPUExecutionProvider"])
        return cls(session, bundle.graph, bundle.config, bundle.kv["dtype"])

    @classmethod
    def from_model(cls, model: str | bytes, io: dict[str, Any], config: ModelConfig,
                   threads: int = 0) -> GraphScorer:
        """A graph that is not (yet) a bundle, e.g. the exporter's in-memory fp32 reference."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return cls(ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]), io,
                   config)

    def logprobs(self, ids: np.ndarray, first_row: int) -> np.ndarray:
        """Log-softmax rows for positions [first_row, len(ids) - 1): row i predicts ids[i+1]."""
        from edgert.runner.step_inputs import fresh_prefill

        t = len(ids)
        x = fresh_prefill(np.asarray(ids, np.int32)[None], self.BLOCK,
                          logits_indices=np.arange(first_row, t - 1))
        names = self.io["inputs"]
        feed = {names[key]: getattr(x, key) for key in (
            "input_ids", "positions", "query_lens", "context_lens", "block_tables",
            "logits_indices")}
        logits = self.session.run([self.io["outputs"]["logits"]], {**feed, **self._pools})[0]
        return _log_softmax(logits.astype(np.float32))


class DenseScorer(GraphScorer):
    """The same windows through a dense-past bundle (exported --via optimum): its adapter on a
    two-block pool, every window a fresh prefill whose padded past is all masked out."""

    def __init__(self, bundle: Bundle, threads: int = 0):
        from edgert.config import BackendConfig
        from edgert.runner.dense_backend import DenseBackend

        self.io, self.config = bundle.graph, bundle.config
        self.backend = DenseBackend(bundle, 2, self.BLOCK, BackendConfig(threads=threads))

    def logprobs(self, ids: np.ndarray, first_row: int) -> np.ndarray:
        from edgert.runner.step_inputs import fresh_prefill

        t = len(ids)
        x = fresh_prefill(np.asarray(ids, np.int32)[None], self.BLOCK,
                          logits_indices=np.arange(first_row, t - 1))
        logits = self.backend.run(x, np.full(x.input_ids.shape, -1, np.int64))
        return _log_softmax(logits.astype(np.float32))


class CachedScorer:
    """Keeps a scorer's windows (as float16 log-probs) so one reference serves many candidates:
    about 0.8 GB for 8k positions of a 49k vocabulary. Float16 costs <1e-3 nats of KL."""

    def __init__(self, scorer: GraphScorer):
        self.scorer = scorer
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def logprobs_for(self, tokens: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
        if window not in self._cache:
            begin, end, first = window
            self._cache[window] = self.scorer.logprobs(
                tokens[begin:end], first - 1 - begin).astype(np.float16)
        return self._cache[window].astype(np.float32)


def _rows(scorer: GraphScorer | CachedScorer, tokens: np.ndarray,
          window: tuple[int, int, int]) -> np.ndarray:
    if isinstance(scorer, CachedScorer):
        return scorer.logprobs_for(tokens, window)
    begin, end, first = window
    return scorer.logprobs(tokens[begin:end], first - 1 - begin)


@dataclass
class EvalResult:
    perplexity: float
    scored_tokens: int
    window: int
    stride: int
    seconds: float
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    mean_kl: float | None = None
    bundle_bytes: int | None = None
    reference_bundle_bytes: int | None = None
    memory: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity_rise(self) -> float | None:
        """Relative change against the reference: 0.01 = +1%."""
        if self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["perplexity_rise"] = self.perplexity_rise
        return d


def evaluate_tokens(candidate: GraphScorer | CachedScorer, tokens: np.ndarray,
                    cfg: EvalConfig | None = None,
                    reference: GraphScorer | CachedScorer | None = None,
                    progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity of `candidate` on `tokens`; with a reference, its perplexity, the top-1
    agreement (argmax equal) and the mean KL(reference || candidate) per scored token."""
    cfg = cfg or EvalConfig()
    tokens = np.asarray(tokens, np.int64)
    windows = plan_windows(len(tokens), cfg)
    start = time.perf_counter()
    nll = ref_nll = kl = 0.0
    agree = n = 0
    for i, w in enumerate(windows):
        targets = tokens[w[2]:w[1]]
        lp = _rows(candidate, tokens, w)
        pick = np.arange(len(targets))
        nll -= float(lp[pick, targets].astype(np.float64).sum())
        if reference is not None:
            rlp = _rows(reference, tokens, w)
            ref_nll -= float(rlp[pick, targets].astype(np.float64).sum())
            agree += int((lp.argmax(-1) == rlp.argmax(-1)).sum())
            kl += float((np.exp(rlp) * (rlp - lp)).sum(dtype=np.float64))
        n += len(targets)
        if progress:
            progress(i + 1, len(windows))
    res = EvalResult(perplexity=math.exp(nll / n), scored_tokens=n, window=cfg.window,
                     stride=cfg.stride, seconds=time.perf_counter() - start)
    if reference is not None:
        res.reference_perplexity = math.exp(ref_nll / n)
        res.top1_agreement = agree / n
        res.mean_kl = kl / n
    return res


def heldout_tokens(encode: Callable[[str], list[int]]) -> np.ndarray:
    return np.asarray(encode(heldout_text()), np.int64)


def bundle_tokens(bundle: Bundle) -> np.ndarray:
    from edgert.text.tokenizer import Tokenizer

    tok = Tokenizer.from_bundle(bundle)
    return heldout_tokens(lambda s: tok.encode(s, add_special_tokens=False))


def evaluate_bundle(bundle: Bundle, reference: Bundle | None = None,
                    cfg: EvalConfig | None = None) -> EvalResult:
    cfg = cfg or EvalConfig()
    tokens = bundle_tokens(bundle)
    ref = None
    if reference is not None:
        if reference.config.vocab_size != bundle.config.vocab_size:
            raise ValueError("reference bundle has a different vocabulary")
        if not np.array_equal(bundle_tokens(reference), tokens):
            raise ValueError("reference bundle tokenizes the held-out text differently")
        ref = GraphScorer.from_bundle(reference, cfg.threads)
    res = evaluate_tokens(GraphScorer.from_bundle(bundle, cfg.threads), tokens, cfg, ref)
    res.bundle_bytes = bundle_size(bundle)
    if reference is not None:
        res.reference_bundle_bytes = bundle_size(reference)
    return res


def bundle_size(bundle: Bundle) -> int:
    """Every file the manifest lists (graph, weights, tokenizer, extras) plus the manifest."""
    return sum(f["bytes"] for f in bundle.manifest["files"].values()) + (
        bundle.path / "manifest.json").stat().st_size


# ---- memory and speed, measured in a child process so nothing else shares its peak ----------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _probe(bundle_path: str, tokens: int, streams: list[int], kv_memory: int,
           threads: int) -> dict[str, Any]:
    """Run in the child: generate `tokens` greedy tokens for 1 and N streams; report peak RSS
    and decode speed. Peak RSS is the process's high-water mark (VmHWM) after generating."""
    from edgert.config import BackendConfig, EngineConfig
    from edgert.engine.llm_engine import LLMEngine
    from edgert.sampling_params import SamplingParams

    base_kib = _status_kib("VmRSS")
    engine = LLMEngine(bundle_path, EngineConfig(
        kv_memory=kv_memory, max_num_seqs=max(streams), verify_bundle=False,
        backend=BackendConfig(threads=threads)))
    loaded_kib = _status_kib("VmRSS")
    prompt = engine.tokenizer.encode("The history of the Python programming language")
    out: dict[str, Any] = {"python_baseline_kib": base_kib, "after_load_kib": loaded_kib,
                           "kv_pool_bytes": engine.block_bytes * engine.allocator.num_blocks,
                           "tokens_per_stream": tokens}
    for n in streams:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for i in range(n):  # warm every shape this stream count uses
            engine.add_request([*prompt, i], warm)
        while engine.has_unfinished():
            engine.step()
        for i in range(n):
            engine.add_request([*prompt, i], params)
        first: float | None = None
        generated = 0
        t0 = time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                generated += len(o.token_ids)
            if first is None:  # after the prefill step: time decode only
                first, generated = time.perf_counter(), 0
        dt = time.perf_counter() - (first or t0)
        out[f"decode_tokens_per_s_{n}"] = generated / dt if dt > 0 else None
    out["peak_rss_kib"] = _status_kib("VmHWM")
    return out


def measure_process(bundle: Bundle | str | Path, tokens: int = 64, streams: tuple[int, ...] = (1,),
                    kv_memory: int = 64 << 20, threads: int = 0,
                    timeout: float = 900) -> dict[str, Any]:
    """Peak resident memory (and decode tokens/s) of a fresh process generating with the
    bundle, the way a board would run it."""
    path = str(bundle.path if isinstance(bundle, Bundle) else bundle)
    code = ("import json, sys; from edgert.tools.evaluate import _probe; "
            "print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]), "
            "[int(s) for s in sys.argv[3].split(',')], int(sys.argv[4]), int(sys.argv[5]))))")
    proc = subprocess.run(
        [sys.executable, "-c", code, path, str(tokens), ",".join(map(str, streams)),
         str(kv_memory), str(threads)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])})
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- reporting ----------------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f} MiB"


def format_summary(res: EvalResult, label: str = "bundle", gate: float | None = None) -> str:
    lines = [f"{label}: perplexity {res.perplexity:.4f} over {res.scored_tokens} held-out "
             f"tokens (window {res.window}, stride {res.stride}, {res.seconds:.0f} s)"]
    if res.reference_perplexity is not None:
        rise = res.perplexity_rise or 0.0
        lines.append(f"  reference perplexity {res.reference_perplexity:.4f}: "
                     f"{rise * 100:+.2f}%" + (f" (gate +{gate * 100:.1f}%)" if gate else ""))
        lines.append(f"  top-1 agreement {res.top1_agreement * 100:.2f}%, mean KL "
                     f"{res.mean_kl:.5f} nats/token")
    if res.bundle_bytes is not None:
        size = f"  bundle size {_mib(res.bundle_bytes)}"
        if res.reference_bundle_bytes:
            size += f" ({res.bundle_bytes / res.reference_bundle_bytes:.3f}x the reference)"
        lines.append(size)
    if res.memory:
        m = res.memory
        lines.append(f"  peak resident memory {m['peak_rss_kib'] / 1024:.1f} MiB while "
                     f"generating (KV pool {_mib(m['kv_pool_bytes'])})")
        speeds = [f"{k.rsplit('_', 1)[1]} stream(s) {v:.1f} tok/s" for k, v in m.items()
                  if k.startswith("decode_tokens_per_s_") and v]
        if speeds:
            lines.append("  decode " + ", ".join(speeds))
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------

def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity, agreement with a reference, size and memory of a bundle",
        description="Score BUNDLE on held-out text (Python's pydoc topics the exporter never "
                    "calibrates on): perplexity; with --reference, that bundle's perplexity, "
                    "top-1 agreement and mean KL divergence of the next-token distributions; "
                    "bundle size and the peak resident memory of a process generating with it.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--reference", default=None, help="reference bundle (e.g. the fp32 export)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score (8192)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--stride", type=int, default=256, help="window stride (256)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: cores)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (a child process generating tokens)")
    p.add_argument("--speed", action="store_true",
                   help="also measure decode tokens/s with 1 and 16 streams")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(func=_eval_cmd)


def _eval_cmd(args: argparse.Namespace) -> int:
    cfg = EvalConfig(window=args.window, stride=args.stride, tokens=args.tokens,
                     threads=args.threads)
    bundle = Bundle.load(args.bundle, verify=not args.no_verify)
    ref = Bundle.load(args.reference, verify=not args.no_verify) if args.reference else None
    res = evaluate_bundle(bundle, ref, cfg)
    if not args.no_memory:
        res.memory = measure_process(bundle, tokens=64 if args.speed else 16,
                                     streams=(1, 16) if args.speed else (1,),
                                     threads=args.threads)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        gate = (bundle.manifest.get("quantization") or {}).get("gate")
        print(format_summary(res, f"{bundle.name} ({bundle.precision})", gate))
    return 0
