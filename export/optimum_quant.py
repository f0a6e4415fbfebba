"""int8 for `edgert export --via optimum`: ONNX Runtime's weight-only quantizer rewrites the
optimum graph's MatMuls with constant weights into MatMulNBits(bits=8): int8 weights in blocks of
32 along the input, symmetric, one scale per block; accuracy level 4 quantizes activations to int8
per row and block at run time (the VNNI kernel the native cpu int8 uses). Behind the same quality
gate as a native int8 bundle (export/gates.py, scored by `edgert eval`'s scorer against the fp32
export).

The native graph's quantizer needs its own graph; a foreign graph can only be quantized by
rewriting its ops. The first cut used quantize_dynamic (DynamicQuantizeLinear -> MatMulInteger):
its one activation scale per TENSOR spans every row of a call, so a row's rounding depended on
the rest of the batch (even its tokens did), and it cost SmolLM2-135M +5.2% perplexity with the
LM head and down projections kept float32, +52% without. Per-row block scales fix both: +0.74%
on SmolLM2-135M (2,048 tokens, top-1 agreement 97.2%) with every projection int8, and a row's
activations are quantized from that row alone. The tied LM head (a MatMul on a transposed
embedding, not a constant) stays float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgert.bundle import DENSE_PAST, MANIFEST
from export.bundle_writer import DATA_FILE, MODEL_FILE, TOKENIZER_FILE, seal, staging_dir

BLOCK = 32
QUANTIZATION = {
    "method": "onnxruntime.quantization.matmul_nbits_quantizer (weight-only)",
    "weights": f"int8, symmetric, blocks of {BLOCK} along the input, one scale per block",
    "activations": "int8 per row and block at run time (MatMulNBits accuracy_level 4)",
    "ops": ["MatMulNBits"],
    # the dense graph's padding already moves logprobs with the batch (README); int8 adds no
    # batch dependence of its own
    "batch_invariant": False,
}


def quantize_dense_bundle(fp32: Path, out: Path, *, overwrite: bool = False) -> Path:
    """The int8 twin of the dense-past bundle at `fp32`, written atomically at `out`."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    manifest: dict[str, Any] = json.loads((fp32 / MANIFEST).read_text())
    if manifest["precision"] != "fp32" or manifest["graph"].get("convention") != DENSE_PAST:
        raise ValueError(f"{fp32}: not an fp32 dense-past bundle")
    tmp = staging_dir(out, overwrite)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.WARNING  # it logs every MatMul at INFO
    try:
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                              accuracy_level=4, bits=8)
        q = MatMulNBitsQuantizer(onnx.load(str(fp32 / MODEL_FILE)), block_size=BLOCK,
                                 is_symmetric=True, accuracy_level=4, algo_config=config)
        q.process()
        onnx.save_model(q.model.model, tmp / MODEL_FILE, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        shutil.copyfile(fp32 / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False).graph
        manifest["precision"] = "int8"
        manifest["quantization"] = {
            **QUANTIZATION,
            "int8_matmuls": sum(n.op_type == "MatMulNBits" for n in graph.node),
            "float32_matmuls": sum(n.op_type == "MatMul" for n in graph.node)}
        seal(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        quiet.level = level
    return out


def export_int8_with_gate(src: str | Path, out: Path, *, block_size: int, name: str | None,
                          force: bool, progress: bool, cache_dir: Path | None,
                          eval_tokens: int, no_eval: bool) -> int:
    """fp32 export (kept aside as the reference), int8 twin, score, then place or refuse."""
    from edgert.bundle import Bundle
    from edgert.tools.evaluate import (
        EvalConfig,
        GraphScorer,
        bundle_size,
        bundle_tokens,
        evaluate_tokens,
        format_summary,
    )
    from edgert.tools.info import describe
    from export.gates import quality_gate
    from export.optimum_export import export_via_optimum
    from export.quant_cli import place_if_within_gate

    reference = out.parent / f".{out.name}.fp32-reference"
    pending = out.parent / f".{out.name}.pending"
    try:
        export_via_optimum(src, reference, block_size=block_size, name=name or out.name,
                           overwrite=True, progress=progress, cache_dir=cache_dir)
        quantize_dense_bundle(reference, pending, overwrite=True)
        bundle = Bundle.load(pending, verify=False)
        print(describe(bundle).replace(str(pending), str(out)))
        if no_eval:
            print("quality gate NOT checked (--no-eval)")
            return place_if_within_gate(pending, out, None, None, "int8/optimum", force)
        ref = Bundle.load(reference, verify=False)
        res = evaluate_tokens(GraphScorer.from_bundle(bundle), bundle_tokens(bundle),
                              EvalConfig(tokens=eval_tokens), GraphScorer.from_bundle(ref))
        res.bundle_bytes, res.reference_bundle_bytes = bundle_size(bundle), bundle_size(ref)
        gate = quality_gate("int8", "cpu", True)
        print(format_summary(res, f"{bundle.name} (int8, optimum MatMulNBits)", gate))
        return place_if_within_gate(pending, out, res.perplexity_rise, gate, "int8/optimum",
                                    force)
    finally:
        for d in (reference, pending):
            shutil.rmtree(d, ignore_errors=True)
