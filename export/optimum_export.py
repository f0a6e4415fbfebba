"""`edgert export SRC --via optimum`: a Hugging Face checkpoint directory -> Hugging Face optimum's
ONNX decoder (dense `past_key_values`) -> an edgert bundle that the runtime serves through its
dense-past adapter (edgert/runner/dense_backend.py) on the same paged pool as a native bundle.

Why: the native paged graph (export/graph.py) covers a few architectures and is fast; optimum
exports dozens of decoders. This path trades speed (the adapter copies the past every step;
measured in the README) for breadth, and is verified architecture by architecture against
transformers (tests/test_optimum_path.py).

optimum runs in its own venv (export/optimum_env.py). Everything the bundle records about the
graph is read from the exported ONNX itself (layers = past pairs, KV heads and head_dim = the
past inputs' static dims, vocabulary = the logits' last dim), not trusted from config.json.

ModelConfig is filled for the runtime's pool and fit plan; fields the graph owns are
informative only: `rms_norm_eps` is the model's norm epsilon whatever the norm (LayerNorm for
GPT-NeoX), `rope_theta` is 0.0 for a model without RoPE, `rope_scaling` is whatever config.json
says (the graph applies it, the runtime never does), and the Llama-only switches (qk_norm, ...)
keep their neutral defaults.

Refused, because the adapter pads each row's past in the middle of the key axis (past | padding
| new): models whose attention depends on a key's INDEX rather than its position id (ALiBi,
sliding windows shorter than the context), and graphs without position_ids or with a past that
is not [batch, kv_heads, past_len, head_dim].
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgert.bundle import DEFAULT_BLOCK_SIZE, DENSE_PAST
from edgert.model_config import ModelConfig
from export.bundle_writer import MODEL_FILE, finish_bundle, pool_manifest, staging_dir
from export.checkpoint import Checkpoint
from export.optimum_env import REQUIREMENTS, ensure_optimum_env, run_in_env

TASK = "text-generation-with-past"
JOB = Path(__file__).with_name("optimum_job.py")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_ALIBI_TYPES = ("bloom", "mpt")


class OptimumExportError(ValueError):
    """SRC cannot go through optimum into a dense-past bundle; the message says why."""


def export_via_optimum(src: str | Path, out: str | Path, *,
                       block_size: int = DEFAULT_BLOCK_SIZE,
                       name: str | None = None, overwrite: bool = False, progress: bool = True,
                       cache_dir: Path | None = None, timeout: float | None = 3600) -> Path:
    """Export SRC (a HF checkpoint directory) through optimum and write the bundle at `out`."""
    path, out = Path(src), Path(out)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise OptimumExportError(
            f"{src}: not a Hugging Face checkpoint directory (no config.json); --via optimum "
            "exports checkpoint directories only (a .gguf goes through --via native)")
    hf = json.loads((path / "config.json").read_text())
    _refuse_index_dependent(hf, path)
    python = ensure_optimum_env(cache_dir, quiet=not progress)
    tmp = staging_dir(out, overwrite)
    try:
        with tempfile.TemporaryDirectory(prefix=".optimum.", dir=out.parent) as work:
            print(f"{hf.get('model_type')}: optimum-onnx exporter ({TASK})", file=sys.stderr,
                  flush=True)
            model_dir = _readable_by_transformers4(path, hf, Path(work))
            done = run_in_env(python, [str(JOB), str(model_dir), str(Path(work) / "onnx")],
                              quiet=True, timeout=timeout)
            if done.returncode == 3:
                raise OptimumExportError(f"{path}: {done.stderr.strip().splitlines()[-1]}")
            if done.returncode != 0:
                raise OptimumExportError(
                    f"{path}: the optimum exporter failed (exit {done.returncode}):\n"
                    f"{done.stderr.strip()[-3000:]}")
            for f in (Path(work) / "onnx").iterdir():  # model.onnx (+ external data > 2 GB)
                if f.name.startswith(MODEL_FILE):
                    shutil.move(str(f), tmp / f.name)
        graph, geometry = dense_graph_manifest(tmp / MODEL_FILE, path)
        config = model_config(hf, geometry, path)
        ckpt = Checkpoint(config=config, weights={}, **_tokenizer_side(path, hf))
        manifest = {
            "config": config.to_dict(),
            "graph": graph,
            "precision": "fp32",
            "quantization": None,
            "calibration": None,
            "kv": pool_manifest("float32", block_size),
        }
        finish_bundle(tmp, out, ckpt, manifest, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dense_graph_manifest(model: Path, source: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(the manifest's `graph`, {layers, kv_heads, head_dim, vocab}) from the ONNX's own IO."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)

    def dims(v: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {v.name: dims(v) for v in m.graph.input}
    outs = {v.name: dims(v) for v in m.graph.output}
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in ins]
    if missing or "logits" not in outs:
        raise OptimumExportError(
            f"{source}: the exported graph lacks {', '.join(missing or ['logits'])}; the dense "
            "adapter needs input_ids, attention_mask, position_ids -> logits (a model that "
            "derives positions from the mask would number the padded past)")
    layers: dict[int, dict[str, str]] = {}
    for n in ins:
        if (hit := _PAST.match(n)):
            layers.setdefault(int(hit[1]), {})[hit[2]] = n
    if not layers or sorted(layers) != list(range(len(layers))) or any(
            len(kv) != 2 for kv in layers.values()):
        raise OptimumExportError(f"{source}: no past_key_values.{{i}}.key/value pairs in the "
                                 "exported graph")
    shapes = {tuple(ins[n]) for kv in layers.values() for n in kv.values()}
    heads_dims = {s[1:2] + s[3:4] for s in shapes if len(s) == 4}
    if len(heads_dims) != 1 or any(len(s) != 4 for s in shapes) or not all(
            isinstance(x, int) and x > 0 for x in next(iter(heads_dims))):
        raise OptimumExportError(
            f"{source}: past_key_values are {sorted(map(list, shapes))}, not one "
            "[batch, kv_heads, past_len, head_dim] with static kv_heads and head_dim")
    kvh, d = next(iter(heads_dims))
    present = [[f"present.{i}.key", f"present.{i}.value"] for i in range(len(layers))]
    if any(n not in outs for pair in present for n in pair):
        raise OptimumExportError(f"{source}: the exported graph lacks present.{{i}}.key/value")
    vocab = outs["logits"][-1]
    if not isinstance(vocab, int) or vocab < 1:
        raise OptimumExportError(f"{source}: the logits' vocabulary dim is not static ({vocab})")
    graph = {
        "file": MODEL_FILE,
        "convention": DENSE_PAST,
        "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "domains": sorted({o.domain for o in m.opset_import}),
        "flavour": "optimum",
        "activation_dtype": "float32",
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "position_ids": "position_ids"},
        "past": [[layers[i]["key"], layers[i]["value"]] for i in range(len(layers))],
        "present": present,
        "outputs": {"logits": "logits"},
        "past_layout": ["batch", "kv_heads", "past_len", "head_dim"],
        "present_layout": ["batch", "kv_heads", "past_len + new", "head_dim"],
        "attention_mask": "[batch, past_len + new]: 1 for a row's real past and real new "
                          "tokens, 0 for padding (the past padded to block_table width x "
                          "block_size, then the new tokens)",
        "position_ids": "[batch, new]: each new token's absolute position (context_len + t)",
        "logits_layout": ["batch", "new", "vocab"],
        "exporter": {"tool": "optimum-onnx", "task": TASK, "requirements": list(REQUIREMENTS)},
    }
    return graph, {"layers": len(layers), "kv_heads": kvh, "head_dim": d, "vocab": vocab}


def model_config(hf: dict[str, Any], geometry: dict[str, int], source: Path) -> ModelConfig:
    """ModelConfig for the pool and the fit plan (see the module docstring for the neutral
    values). The geometry comes from the graph; config.json only fills the rest."""

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if hf.get(k) is not None:
                return hf[k]
        return default

    rope = first("rope_parameters", default={}) or {}
    hidden = int(first("hidden_size", "n_embd", "d_model", default=0))
    heads = int(first("num_attention_heads", "n_head", default=geometry["kv_heads"]))
    max_pos = first("max_position_embeddings", "n_positions", "max_sequence_length")
    if max_pos is None:
        raise OptimumExportError(f"{source}/config.json names no max_position_embeddings")
    return ModelConfig(
        architecture=str(hf.get("model_type")),
        vocab_size=geometry["vocab"],
        hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim",
                                    default=4 * hidden) or 4 * hidden),
        num_layers=geometry["layers"],
        num_heads=heads,
        num_kv_heads=geometry["kv_heads"],
        head_dim=geometry["head_dim"],
        rms_norm_eps=float(first("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
                                 "norm_eps", default=0.0)),
        rope_theta=float(first("rope_theta", "rotary_emb_base",
                               default=rope.get("rope_theta", 0.0))),
        max_position_embeddings=int(max_pos),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(first("attention_bias", "use_qkv_bias", "qkv_bias",
                                  default=False)),
        rope_scaling=first("rope_scaling"),
    )


def _readable_by_transformers4(path: Path, hf: dict[str, Any], work: Path) -> Path:
    """`path` itself, or a view of it whose config.json transformers 4.57 reads as 5.x meant it.

    transformers 5 saves RoPE as `rope_parameters` and no `rope_theta`; 4.57 ignores the former
    and silently falls back to its default theta (10,000), which would export a different
    model. The view links every file but a config.json that spells the same RoPE the 4.x way."""
    rope = hf.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in hf:
        return path.resolve()
    if any(isinstance(v, dict) for v in rope.values()):
        raise OptimumExportError(
            f"{path}/config.json has per-layer-type rope_parameters (transformers 5); the "
            "optimum exporter's transformers 4.57 cannot read them")
    view = work / "checkpoint"
    view.mkdir()
    for f in path.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    params = {k: v for k, v in rope.items() if k != "rope_theta"}
    legacy = {**hf, "rope_theta": rope["rope_theta"],
              "rope_scaling": params if params.get("rope_type", "default") != "default" else None}
    (view / "config.json").write_text(json.dumps(legacy, indent=2))
    return view


def _refuse_index_dependent(hf: dict[str, Any], source: Path) -> None:
    arch = hf.get("model_type")
    if arch in _ALIBI_TYPES or hf.get("alibi"):
        raise OptimumExportError(
            f"{source}: {arch} uses ALiBi, whose bias counts key distance by index; the dense "
            "adapter pads each row's past, so those distances would be wrong")
    window, max_pos = hf.get("sliding_window"), hf.get("max_position_embeddings")
    if window and hf.get("use_sliding_window", True) and (max_pos is None or window < max_pos):
        raise OptimumExportError(
            f"{source}: {arch} uses a {window}-token sliding window, counted by key index; the "
            "dense adapter pads each row's past, so the window would be wrong")


def _tokenizer_side(path: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """The Checkpoint fields the bundle writer takes from the source besides the graph, read
    by the native HF loader's own reader, so the two paths agree."""
    from export.hf_loader import UnsupportedModelError, read_tokenizer_side
    from export.pull import sha256_file

    try:
        side = read_tokenizer_side(path, hf)
    except UnsupportedModelError as e:
        raise OptimumExportError(str(e)) from None
    read = [p for p in sorted(path.iterdir()) if p.suffix in (".json", ".safetensors", ".jinja")]
    return {
        **side,
        "provenance": {"kind": "hf", "via": "optimum", "path": str(path.resolve()),
                       "architectures": hf.get("architectures"),
                       "dtype": hf.get("dtype", hf.get("torch_dtype")),
                       "files": {p.name: sha256_file(p) for p in read}},
    }
