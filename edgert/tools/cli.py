"""The `edgert` command. Runtime commands live here; host-side ones (pull, export) are plugged in
through the `edgert.commands` entry point group, so a board without the export extra still has a
working CLI and the runtime never imports the exporter."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from edgert.bundle import Bundle, BundleError
from edgert.config import add_engine_args, engine_config_from_args, parse_memory


def _generate(args: argparse.Namespace) -> int:
    from edgert.engine.llm_engine import LLMEngine
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
    from edgert.tools.info import describe

    print(describe(Bundle.load(args.bundle, verify=not args.no_verify)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from edgert.serve.lifecycle import serve_from_args

    return serve_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    if args.offline:
        from edgert.tools import bench_offline

        if not args.bundle:
            raise ValueError("--offline needs a BUNDLE")
        return bench_offline.main(args, engine_config_from_args(args))
    from edgert.tools.bench_serve import bench_from_args

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
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the fewest tokens whose probabilities sum to P (1 = off)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the K likeliest tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="makes a sampled completion repeatable (default: a fresh draw)")
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
                   choices=["debug", "info", "warning", "error"],
                   help="the least severe server log lines shown (default: info)")
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
    p.add_argument("--versus", choices=["sequential", "one-decode-call", "constrained"],
                   default="sequential",
                   help="with --offline, what the batched run is compared with: one sequence at "
                        "a time (default), every decoder in one call per step (no length "
                        "classes), or the same batch with every 4th request constrained to a "
                        "JSON array of integers (the cost of constrained decoding)")
    add_engine_args(p)
    target = p.add_argument_group("target")
    target.add_argument("--socket", metavar="PATH", help="the server's Unix socket")
    target.add_argument("--url", help="the server's base URL instead, e.g. http://127.0.0.1:8000")
    p.set_defaults(func=_bench)
    from edgert.tools.bench_serve import add_bench_args

    add_bench_args(p)
    from edgert.tools.evaluate import register_eval

    register_eval(sub)
    from edgert.tools.build_engine import register as register_build_engine

    register_build_engine(sub)
    from edgert.tools.deploy import register as register_deploy

    register_deploy(sub)
    from edgert.tools.pack import register as register_pack

    register_pack(sub)
    from edgert.tools.install import register as register_install

    register_install(sub)
    from edgert.tools.board import register as register_board

    register_board(sub)
    from edgert.tools.plan import register as register_plan

    register_plan(sub)
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
