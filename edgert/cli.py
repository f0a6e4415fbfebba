"""The `edgert` command. Runtime commands live here; host-side ones (pull, export) are plugged in
through the `edgert.commands` entry point group, so a board without the export extra still has a
working CLI and the runtime never imports the exporter."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from edgert.bundle import Bundle, BundleError


def _info(args: argparse.Namespace) -> int:
    from edgert.info import describe

    print(describe(Bundle.load(args.bundle, verify=not args.no_verify)))
    return 0


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
    for ep in entry_points(group="edgert.commands"):
        try:
            ep.load()(sub)
        except ImportError as e:  # export extra not installed on this machine
            sub.add_parser(ep.name, help=f"(unavailable: {e.name} is not installed; "
                                         "pip install 'edgert[export]')")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "func"):
        print(f"edgert {args.command}: unavailable here; install the export extra: "
              "pip install 'edgert[export]'", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (BundleError, ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"edgert {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
