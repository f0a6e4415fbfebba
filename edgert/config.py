"""Every runtime setting in one place: the configs the engine, the scheduler and the backends take,
and the command-line flags that fill them (shared by `edgert generate`, `serve` and `bench`), so
the CLI and the server both import this module and never each other."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

MiB = 1 << 20


SPINNING = ("off", "step", "on")


@dataclass
class BackendConfig:
    # cpu: ONNX Runtime on the CPU; cuda / tensorrt: ONNX Runtime's CUDA / TensorRT execution
    # provider with the pool on the GPU; tensorrt-native: TensorRT with the board's plan.
    provider: str = "cpu"
    threads: int = 0  # intra-op threads; 0 = one per physical core (ORT's default)
    # ORT's worker threads between ops: "off" sleeps (a futex wake-up per op ORT splits across
    # the cores: ~180 a SmolLM2 decode step), "step" spins while a step runs and stops when it
    # returns (the event loop and the tokenizer get the cores between steps), "on" spins always
    # (starves them on 2 cores).
    # Measured in scripts/bench_spinning.py and bench_vs_llamacpp.py; see the README.
    spinning: str = "off"
    optimization: str = "all"  # basic | extended | all
    device_id: int = 0  # which GPU
    device_profile: str | None = None  # devices/*.json name: selects the TensorRT plan
    engine_cache: str | None = None  # ORT's TensorRT provider: where its engines are cached

    def __post_init__(self) -> None:
        if self.spinning not in SPINNING:
            raise ValueError(f"spinning must be one of {', '.join(SPINNING)}, "
                             f"not {self.spinning!r}")


COST_BLOCK_TOKENS = 16  # tokens of past in one row-block of the decode cost model below


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running sequences at once (the decode batch)
    max_num_batched_tokens: int = 256  # padded prefill tokens per step
    max_model_len: int = 2048  # prompt + output tokens a sequence may reach
    max_waiting: int = 256  # backpressure: beyond this, new requests are refused
    # The decode length-class cost model, in "row-blocks" (one sequence's 16 tokens of past
    # gathered and attended; COST_BLOCK_TOKENS, scaled to the pool's block size): a graph call's
    # fixed cost and a decode row's fixed cost. Measured on SmolLM2-135M, 2 Zen 4 cores (fp32 and
    # int4 alike): ~18 ms a call, ~1.2 ms a row, ~0.1 ms a row-block. The same two prices decide
    # where a prompt is cut into prefill chunks
    # (core/scheduler.py, prefill_chunk). Only speed depends on them: answers are batch-invariant.
    decode_call_cost: int = 160
    decode_row_cost: int = 12
    # Length classes per decode step; 1: one call for every decoder, padded to the longest (the
    # first cut's behaviour, kept to measure against).
    max_decode_calls: int = 2
    # Prompt-lookup speculative decoding (core/prompt_lookup.py): guessed tokens checked per
    # decode step for requests that do not say (0: off), while at most `speculative_max_seqs`
    # sequences decode: a guess makes its sequence a call of its own, which pays off when the
    # call's fixed cost is not shared with other decoders.
    speculative_tokens: int = 0
    speculative_max_seqs: int = 1
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.speculative_tokens <= 15:
            raise ValueError("speculative_tokens must be in [0, 15]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("ngram sizes must satisfy 1 <= ngram_min <= ngram_max")
        if self.speculative_max_seqs < 1:
            raise ValueError("speculative_max_seqs must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 2:
            raise ValueError("max_num_batched_tokens must be >= 2")
        if self.max_decode_calls < 1:
            raise ValueError("max_decode_calls must be >= 1")


@dataclass
class EngineConfig:
    # Bytes for the KV pool, allocated once at start; None: what the device's fit plan leaves
    # (`kv_fraction` of it), refused when the bundle does not fit.
    kv_memory: int | None = 256 * MiB
    kv_fraction: float = 0.9
    block_size: int | None = None  # None: the bundle's default
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None  # None: the model's context length
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    max_decode_calls: int = 2
    speculative_tokens: int = 0
    speculative_max_seqs: int = 1
    backend: BackendConfig = field(default_factory=BackendConfig)
    verify_bundle: bool = True

    def scheduler(self, model_len: int) -> SchedulerConfig:
        """The scheduler's settings for a model whose context is `model_len` tokens."""
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=min(self.max_model_len or model_len, model_len),
            max_waiting=self.max_waiting, max_decode_calls=self.max_decode_calls,
            speculative_tokens=self.speculative_tokens,
            speculative_max_seqs=self.speculative_max_seqs)


# ---- command-line flags ------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_memory(text: str, available: int | None = None) -> int:
    """'512MiB', '1.5G', '1048576', or '25%' of `available` (default: MemAvailable now)."""
    t = text.strip().lower()
    if t.endswith("%"):
        frac = float(t[:-1]) / 100
        if not 0 < frac <= 0.9:
            raise ValueError(f"--kv-memory {text}: a percentage must be in (0, 90]")
        return int((mem_available() if available is None else available) * frac)
    num = t.rstrip("kmgib")
    unit = t[len(num):]
    if unit not in _UNITS:
        raise ValueError(f"--kv-memory {text}: unknown unit (use KiB, MiB, GiB)")
    try:
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"--kv-memory {text}: not a size") from None


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The runtime's options, shared by generate, serve and bench."""
    g = p.add_argument_group("engine")
    g.add_argument("--kv-memory", default=None,
                   help="KV pool size, allocated once at start: bytes with a unit (512MiB), "
                        "'auto' (what the fit plan of --device leaves after weights, "
                        "activations, CUDA context and OS reserve: see `edgert plan`; without "
                        "--device, this machine's CPU profile), or a percentage (25%%) of that "
                        "with --device, else of the memory available now. A pool that does not "
                        "fit is refused at start. Default: auto with --device, else 256MiB")
    g.add_argument("--device", default=None,
                   help="device profile (devices/*.json: orin-nano-8gb, t4-16gb, ...) that "
                        "sizes the pool and the limits")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the bundle's)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences decoded together per step (default: the --device "
                        "profile's, else 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="prefill tokens per step, padded, so a long prompt cannot stall "
                        "decoding (default 256)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output limit per sequence (default: the model's context)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests beyond which new ones get 429 (default 256)")
    g.add_argument("--max-decode-calls", type=int, default=2,
                   help="decode length classes per step: sequences far apart in length are "
                        "decoded in separate calls so the short ones do not gather the long "
                        "one's padding (default 2; 1 = one call)")
    g.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding: check up to K tokens guessed from "
                        "the sequence's own context per decode step (a request's "
                        "speculative_tokens overrides it). Outputs are identical with and "
                        "without; it pays off on repetitive text (quoting, code edits) at low "
                        "concurrency (default 0: off)")
    g.add_argument("--speculative-max-seqs", type=int, default=1, metavar="N",
                   help="speculate only while at most N sequences decode (default 1)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse KV blocks of identical prompt prefixes")
    g.add_argument("--provider", default="cpu",
                   choices=["cpu", "cuda", "tensorrt", "tensorrt-native"],
                   help="where the graph runs: cpu (ONNX Runtime, default); cuda / tensorrt "
                        "(ONNX Runtime's CUDA / TensorRT execution provider, KV pool on the "
                        "GPU); tensorrt-native (TensorRT with the plan `edgert build-engine` "
                        "made on this board; needs --device). The GPU ones were not run in "
                        "this project's CI (no GPU): see the README")
    g.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (default: one per core)")
    g.add_argument("--spinning", default="off", choices=SPINNING,
                   help="ORT worker threads between ops: off (sleep; default), step (spin "
                        "while a step runs, stop when it returns), on (spin always: starves "
                        "the server's event loop on 2 cores)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the bundle's sha256 verification at load")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    text = (args.kv_memory or ("auto" if args.device else "256MiB")).strip().lower()
    kv_memory: int | None = None
    fraction = 0.9
    if text.endswith("%") and args.device:
        fraction = parse_memory(text, available=MiB) / MiB  # checked like any percentage
    elif text != "auto":
        kv_memory = parse_memory(text)
    max_num_seqs = args.max_num_seqs or 16
    if args.device:
        import devices

        profile = devices.load(args.device)
        max_num_seqs = args.max_num_seqs or profile.max_num_seqs
        if args.max_model_len is None:
            args.max_model_len = profile.max_model_len
    return EngineConfig(
        kv_memory=kv_memory, kv_fraction=fraction, block_size=args.block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, enable_prefix_caching=not args.no_prefix_caching,
        max_decode_calls=args.max_decode_calls,
        speculative_tokens=args.speculative_tokens,
        speculative_max_seqs=args.speculative_max_seqs,
        backend=BackendConfig(provider=args.provider, threads=args.threads,
                              spinning=args.spinning, device_profile=args.device),
        verify_bundle=not args.no_verify)
