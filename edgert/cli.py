"""The `edgert` command. Runtime commands live here; host-side ones (pull, export) are plugged in
through the `edgert.commands` entry point group, so a board without the export extra still has a
working CLI and the runtime never imports the exporter."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from edgert.bundle import Bundle, BundleError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_memory(text: str, available: int | None = None) -> int:
    """'512MiB', '1.5G', '1048576', or '25%' of `available` (default: MemAvailable now)."""
    t = text.strip().lower()
    if t.endswith("%"):
        frac = float(t[:-1]) / 100
        if not 0 < frac <= 0.9:
            raise ValueError(f"--kv-memory {text}: a percentage must be in (0, 90]")
        return int((_mem_available() if available is None else available) * frac)
    num = t.rstrip("kmgib")
    unit = t[len(num):]
    if unit not in _UNITS:
        raise ValueError(f"--kv-memory {text}: unknown unit (use KiB, MiB, GiB)")
    try:
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"--kv-memory {text}: not a size") from None


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The runtime's options, shared by generate, serve and bench."""
    g = p.add_argument_group("engine")
    g.add_argument("--kv-memory", default=None,
                   help="KV pool size, allocated once at start: bytes with a unit (512MiB) or a "
                        "percentage (25%%) of the memory left after the weights on --device, "
                        "else of the memory available now. Default: 90%% of the device's free "
                        "memory with --device, else 256MiB")
    g.add_argument("--device", default=None,
                   help="device profile (devices/*.json: orin-nano-8gb, t4-16gb, ...) that "
                        "sizes the pool and the limits")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the bundle's)")
    g.add_argument("--max-num-seqs", type=int, default=16,
                   help="sequences decoded together per step (default 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="prefill tokens per step, so a long prompt cannot stall decoding "
                        "(default 256)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output limit per sequence (default: the model's context)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests beyond which new ones get 429 (default 256)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse KV blocks of identical prompt prefixes")
    g.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (default cpu)")
    g.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (default: one per core)")
    g.add_argument("--spinning", action="store_true",
                   help="let ORT worker threads spin between ops (off: on 2 cores spinning "
                        "starves the server's event loop)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the bundle's sha256 verification at load")


def engine_config_from_args(args: argparse.Namespace):
    from edgert.backend_ort import BackendConfig
    from edgert.engine import EngineConfig

    kv_memory = parse_memory(args.kv_memory or "256MiB")
    if args.device:
        import devices

        profile = devices.load(args.device)
        weights = Bundle.load(args.bundle, verify=False).weights_bytes()
        free = profile.kv_budget(weights, fraction=1.0)
        kv_memory = parse_memory(args.kv_memory or "90%", available=free)
        if args.max_model_len is None:
            args.max_model_len = profile.max_model_len
    return EngineConfig(
        kv_memory=kv_memory, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, enable_prefix_caching=not args.no_prefix_caching,
        backend=BackendConfig(provider=args.provider, threads=args.threads,
                              allow_spinning=args.spinning),
        verify_bundle=not args.no_verify)


def _generate(args: argparse.Namespace) -> int:
    from edgert.engine import LLMEngine
    from edgert.sampling_params import SamplingParams

    engine = LLMEngine(args.bundle, engine_config_from_args(args))
    tok = engine.tokenizer
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tok.encode(prompt, add_special_tokens=not args.chat)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=args.stop or [])
    engine.add_request(ids, params)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finished:
                final = out
    sys.stdout.write("\n")
    if args.verbose and final is not None and final.metrics is not None:
        m = final.metrics
        tpot = f"{m.tpot * 1000:.1f} ms" if m.tpot else "n/a"
        print(f"[{final.finish_reason}] prompt {m.prompt_tokens} tokens, output "
              f"{m.completion_tokens} tokens, TTFT {m.ttft * 1000:.0f} ms, TPOT {tpot}",
              file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from edgert.info import describe

    print(describe(Bundle.load(args.bundle, verify=not args.no_verify)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from edgert.server import serve_from_args

    return serve_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    if args.offline:
        from edgert import bench_offline

        if not args.bundle:
            raise ValueError("--offline needs a BUNDLE")
        return bench_offline.main(args, engine_config_from_args(args))
    from edgert.bench_serve import bench_from_args

    return bench_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgert", description="Edge LLM inference runtime: export, inspect, run and serve "
                                   "models with a paged KV cache and continuous batching.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="show what a bundle holds and the memory it needs",
                       description="Verify a bundle's checksums and print its configuration, "
                                   "files and memory needs.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(func=_info)

    p = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal",
                       description="Load a bundle and stream a completion of PROMPT to stdout.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the bundle's chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    add_engine_args(p)
    p.set_defaults(func=_generate)
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API over a Unix socket",
                       description="Load a bundle and serve /v1/completions, "
                                   "/v1/chat/completions, /v1/models, /v1/tokenize, /health and "
                                   "/metrics over a Unix socket (and optionally TCP on loopback)."
                                   " SIGTERM drains in-flight requests, then exits 0.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--socket", metavar="PATH",
                   help="Unix socket to create (mode 0660); ignored under socket activation")
    p.add_argument("--socket-group", metavar="GROUP", help="group (name or gid) of the socket")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also serve TCP (off by default; loopback addresses only)")
    p.add_argument("--listen-any-address", action="store_true",
                   help="allow --listen on a non-loopback address (no access control on TCP)")
    p.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                   help="only peers with this uid (SO_PEERCRED) may connect; repeatable")
    p.add_argument("--allow-gid", type=int, action="append", metavar="GID",
                   help="only peers with this primary gid may connect; repeatable")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (30)")
    p.add_argument("--max-body-size", type=parse_memory, default="4MiB",
                   help="largest request body; larger ones get 413 (4MiB)")
    p.add_argument("--served-model-name", help="model id in the API (default: the bundle's name)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip running every shape bucket before ready (development only: "
                        "the first requests are then slow)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("bench", help="load-test a running server, or the engine offline",
                       description="With --socket/--url: send requests at several concurrency "
                                   "levels (optionally with Poisson arrivals) and report TTFT, "
                                   "TPOT, end-to-end latency percentiles and output tokens/s. "
                                   "With BUNDLE --offline: run the same workload through the "
                                   "engine batched (max_num_seqs = the largest --concurrency) "
                                   "and one sequence at a time, side by side, and print the "
                                   "throughput ratio.")
    p.add_argument("bundle", nargs="?", help="bundle directory (with --offline)")
    p.add_argument("--offline", action="store_true",
                   help="benchmark the engine in-process instead of a server")
    add_engine_args(p)
    target = p.add_argument_group("target")
    target.add_argument("--socket", metavar="PATH", help="the server's Unix socket")
    target.add_argument("--url", help="the server's base URL instead, e.g. http://127.0.0.1:8000")
    p.set_defaults(func=_bench)
    from edgert.bench_serve import add_bench_args

    add_bench_args(p)
    from edgert.evaluate import register_eval

    register_eval(sub)
    for ep in entry_points(group="edgert.commands"):
        try:
            ep.load()(sub)
        except ImportError as e:  # export extra not installed on this machine (a board)
            help_text = (f"(unavailable: {e.name} is not installed; "
                         "pip install 'edgert[export]')")
            p = sub.choices.get(ep.name) or sub.add_parser(ep.name, help=help_text,
                                                           add_help=False)
            p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if getattr(args, "func", None) is None:
        print(f"edgert {args.command}: unavailable here; install the export extra: "
              "pip install 'edgert[export]'", file=sys.stderr)
        return 2
    if extra:
        build_parser().parse_args(argv)  # reports the unknown arguments and exits 2
    try:
        return int(args.func(args) or 0)
    except (BundleError, ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"edgert {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
