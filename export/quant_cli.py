"""`edgert export`'s quantization options and its quality gate.

A quantized bundle (or a float one with a float16 KV pool) is written beside the target, scored
on held-out text against the float graph of the same checkpoint (built in memory, never written),
and moved into place only if its perplexity rose no more than the gate for its configuration
(export/gates.py; fp32 has none), or with --force. The summary printed is the one `edgert eval`
prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from export.calibration import CalibConfig
from export.checkpoint import Checkpoint
from export.quantize import QuantConfig


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                   help="weight precision (default fp32). fp16: a float16 graph (weights, "
                        "activations and KV cache float16; RMSNorm and softmax in float32); "
                        "int8: per-channel weights with int8 activations; int4: weight-only, "
                        "blocks along the input dimension")
    g.add_argument("--flavour", default="cpu", choices=["portable", "cpu"],
                   help="cpu (default): ONNX Runtime's fused CPU kernels (MatMulNBits, "
                        "MatMulInteger), float32 activations; portable: standard Q/DQ ops with "
                        "float16 scales and activations, what TensorRT builds strongly typed")
    g.add_argument("--group-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                   help="int4 block size along the input dimension (default 32); the portable "
                        "flavour uses the largest divisor of each layer's width not above it")
    g.add_argument("--method", default=None, choices=["gptq", "rtn"],
                   help="how int8/int4 weights are chosen: gptq (calibrated, default) or rtn "
                        "(round to nearest: fast, no Hessians)")
    g.add_argument("--int8-kernel", default="blocks", choices=["blocks", "rows", "mixed"],
                   help="cpu int8: blocks (MatMulNBits 8-bit, scales per --int8-block "
                        "inputs, default: the accurate one) or rows (per-channel weights, "
                        "per-row activations, MatMulInteger: faster in batches, less accurate) "
                        "or mixed (rows for the MLP's gate_up projection, blocks elsewhere: "
                        "SmolLM2 serves 1.2x faster at 16 streams on AVX2 without VNNI, top-1 "
                        "97.0%% instead of 97.4%%)")
    g.add_argument("--int8-block", type=int, default=32, choices=[16, 32, 64, 128],
                   help="cpu int8 blocks: inputs per weight scale, and per activation scale "
                        "inside MatMulNBits (default 32; 64: SmolLM2 steps 0.9x the time at "
                        "perplexity +0.26%% instead of +0.20%%); the embedding table keeps 32")
    g.add_argument("--smooth-alpha", type=float, default=None,
                   help="SmoothQuant strength for int8 (default 0.75 cpu, 0.5 portable; 0 off)")
    g.add_argument("--asymmetric", action="store_true",
                   help="int4 with a zero point per block (cpu flavour only)")
    g.add_argument("--zero-point", default="float", choices=["float", "int"],
                   help="asymmetric zero point: float minimum (Q4_1's grid, default) or uint8")
    g.add_argument("--embedding-precision", default=None, choices=["fp32", "fp16", "int8"],
                   help="embedding table (default int8 for int8/int4, else --precision)")
    g.add_argument("--lm-head-precision", default=None,
                   choices=["fp32", "fp16", "int8", "int4"],
                   help="LM head (default: the embedding's; a tied head then shares its table). "
                        "A head coarser than the body sets the bundle's quality gate")
    g.add_argument("--scale-dtype", default="float16", choices=["float16", "float32"],
                   help="int4 block scale storage (default float16; float32: cpu flavour only)")
    g.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16"],
                   help="KV cache (pool and new_kv) dtype: auto (default) = the activation "
                        "dtype; float16 halves a float32 graph's pool (fp32 and the cpu "
                        "flavours), which still computes in float32 (SmolLM2 int8: perplexity "
                        "+0.09%%, decode steps 0.95x the time); float16 graphs keep float16")
    g.add_argument("--kv-write", default="auto", choices=["auto", "scatter", "in-place"],
                   help="how the cpu flavours place the step's K/V among the gathered past: "
                        "in-place (TensorScatter, opset 24; needs --kv-dtype float16: SmolLM2 "
                        "int8, 16 sequences over 1k tokens, ~0.7x the step time at the same "
                        "memory) or scatter (ScatterND copies the past first). auto (default): "
                        "in-place where it applies, else scatter")
    g.add_argument("--calib", default="builtin",
                   help="calibration text: 'builtin' (Python's pydoc topics, calibration half) "
                        "or a UTF-8 text file")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration windows (32)")
    g.add_argument("--calib-seqlen", type=int, default=256, help="tokens per window (256)")
    g.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens scored for the quality gate (8192)")
    g.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation: the quality gate is then NOT checked")


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    if args.calib != "builtin" and not Path(args.calib).is_file():
        raise FileNotFoundError(f"--calib {args.calib}: no such file")
    return QuantConfig(
        precision=args.precision, flavour=args.flavour, group_size=args.group_size,
        method=args.method, symmetric=not args.asymmetric, zero_point=args.zero_point,
        scale_dtype=args.scale_dtype, embedding=args.embedding_precision,
        lm_head=args.lm_head_precision, int8_kernel=args.int8_kernel,
        int8_block=args.int8_block,
        smooth_alpha=args.smooth_alpha, kv_dtype=args.kv_dtype, kv_write=args.kv_write,
        calib=CalibConfig(source=args.calib, samples=args.calib_samples,
                          seqlen=args.calib_seqlen))


def export_with_gate(ckpt: Checkpoint, args: argparse.Namespace, quant: QuantConfig) -> int:
    from tokenizers import Tokenizer

    from edgert.bundle import Bundle
    from edgert.tools.evaluate import (
        EvalConfig,
        GraphScorer,
        bundle_size,
        evaluate_tokens,
        format_summary,
        heldout_tokens,
    )
    from edgert.tools.info import describe
    from export.bundle_writer import graph_io_manifest, write_bundle
    from export.graph import build_decoder

    out: Path = args.output
    pending = out.parent / f".{out.name}.pending"
    progress = not args.no_progress
    write_bundle(ckpt, pending, block_size=args.block_size, progress=progress,
                 name=args.name or out.name, overwrite=True, quant=quant)
    try:
        bundle = Bundle.load(pending, verify=False)
        print(describe(bundle).replace(str(pending), str(out)))
        tok = Tokenizer.from_str(ckpt.tokenizer_json)
        tokens = heldout_tokens(lambda s: tok.encode(s, add_special_tokens=False).ids)
        cfg = EvalConfig(tokens=args.eval_tokens)
        fp32 = build_decoder(ckpt).SerializeToString()
        reference = GraphScorer.from_model(fp32, graph_io_manifest(ckpt.config.num_layers),
                                           ckpt.config)
        res = evaluate_tokens(GraphScorer.from_bundle(bundle), tokens, cfg, reference)
        res.bundle_bytes = bundle_size(bundle)
        # what the fp32 bundle would hold: its graph with weights, and the tokenizer
        res.reference_bundle_bytes = len(fp32) + len(ckpt.tokenizer_json.encode())
        del reference, fp32
        gate = quant.gate
        kv = f", KV {quant.kv_pool_dtype}" if quant.kv_dtype != "auto" else ""
        print(format_summary(res, f"{bundle.name} ({quant.precision}, {quant.graph_flavour}{kv})",
                             gate))
        return place_if_within_gate(pending, out, res.perplexity_rise, gate,
                                    f"{quant.precision}/{quant.graph_flavour}", args.force)
    finally:
        if pending.exists():
            shutil.rmtree(pending, ignore_errors=True)


def place_if_within_gate(pending: Path, out: Path, rise: float | None, gate: float | None,
                         what: str, force: bool) -> int:
    """Move the scored bundle at `pending` to `out` unless its perplexity rise breaks the gate
    (then remove it, unless `force`). The exit status of `edgert export`."""
    rise = rise or 0.0
    if gate is not None and rise > gate:
        if not force:
            print(f"REFUSED: perplexity rose {rise * 100:+.2f}%, more than the "
                  f"{gate * 100:.1f}% gate for {what}; nothing written (--force keeps it "
                  "anyway)")
            shutil.rmtree(pending, ignore_errors=True)
            return 1
        print(f"WARNING: perplexity rose {rise * 100:+.2f}%, beyond the "
              f"{gate * 100:.1f}% gate; kept because of --force")
    if out.exists():
        shutil.rmtree(out)
    os.replace(pending, out)
    print(f"wrote {out}")
    return 0
