"""Writes a bundle directory from a Checkpoint. The bundle is assembled in a temporary directory
beside the target and renamed into place only when complete, so an interrupted or failed export
never leaves a half-written bundle that looks valid."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from tqdm import tqdm

from edgert import __version__
from edgert.bundle import DEFAULT_BLOCK_SIZE, FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from export.calibration import Calibration
from export.checkpoint import Checkpoint
from export.graph import FLOAT32_ISLANDS, IO, build_decoder
from export.quantize import QuantConfig, build_quantized

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
CALIBRATION_FILE = "calibration.npz"


def graph_io_manifest(num_layers: int) -> dict[str, Any]:
    return {
        "inputs": {k: getattr(IO, k) for k in ("input_ids", "positions", "query_lens",
                                               "context_lens", "block_tables", "logits_indices")},
        "outputs": {"logits": IO.logits, "new_kv": IO.new_kv},
        "pools": [[IO.pool_key(i), IO.pool_value(i)] for i in range(num_layers)],
    }


def write_bundle(ckpt: Checkpoint, out: Path, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 progress: bool = True,
                 name: str | None = None, overwrite: bool = False,
                 quant: QuantConfig | None = None, calibration: Calibration | None = None
                 ) -> Path:
    """`quant` None (or plain fp32) writes the float graph; otherwise export/quantize.py builds
    it, calibrating first unless `calibration` is given (several exports can share one)."""
    out = Path(out)
    cfg = ckpt.config
    tmp = staging_dir(out, overwrite)
    try:
        meta: dict[str, Any] = {"precision": "fp32", "flavour": "portable", "domains": [""],
                                "quantization": None, "calibration": None, "ort": {},
                                "dtype": "float32",
                                "kv_dtype": quant.kv_pool_dtype if quant else "float32"}
        with tqdm(total=cfg.num_layers, desc="build graph", unit="layer",
                  disable=not progress) as bar:
            if quant is None or quant.is_plain_fp32:
                model = build_decoder(ckpt, progress=bar.update, kv_dtype=meta["kv_dtype"])
            else:
                qg = build_quantized(ckpt, quant, calibration, progress=bar.update,
                                     show_progress=progress)
                model = qg.model
                meta.update(precision=qg.precision, flavour=qg.flavour, domains=qg.domains,
                            quantization=qg.quantization, ort=qg.ort_session_config,
                            dtype=qg.activation_dtype, kv_dtype=qg.kv_dtype)
                if qg.calibration is not None:
                    qg.calibration.to_npz(tmp / CALIBRATION_FILE)
                    meta["calibration"] = qg.calibration.manifest()
        with tqdm(total=1, desc="write onnx", disable=not progress) as bar:
            onnx.save_model(model, tmp / MODEL_FILE, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE,
                            size_threshold=1024)
            bar.update()
        manifest = {
            "config": cfg.to_dict(),
            "graph": {"file": MODEL_FILE, "domains": meta["domains"],
                      "opset": next(o.version for o in model.opset_import if o.domain == ""),
                      "flavour": meta["flavour"], "activation_dtype": meta["dtype"],
                      **({"float32_islands": list(FLOAT32_ISLANDS)}
                         if meta["dtype"] != "float32" else {}),
                      **graph_io_manifest(cfg.num_layers),
                      **({"ort_session_config": meta["ort"]} if meta["ort"] else {})},
            "precision": meta["precision"],
            "quantization": meta["quantization"],
            "calibration": meta["calibration"],
            "kv": {
                **pool_manifest(meta["kv_dtype"], block_size),
                "new_kv_layout": ["layers", 2, "S", "T", "kv_heads", "head_dim"],
            },
        }
        finish_bundle(tmp, out, ckpt, manifest, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def pool_manifest(kv_dtype: str, block_size: int) -> dict[str, Any]:
    """The runtime's paged pool, which every bundle's backend computes on."""
    return {
        "layout": ["num_blocks", "kv_heads", "block_size", "head_dim"],
        # the pools' and new_kv's dtype: the activations', or float16 under float32 ones
        "dtype": kv_dtype,
        "block_size": block_size,
        "null_block": 0,
    }


def staging_dir(out: Path, overwrite: bool) -> Path:
    """A fresh directory beside `out` to assemble a bundle in (see the module docstring)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def finish_bundle(tmp: Path, out: Path, ckpt: Checkpoint, manifest: dict[str, Any],
                  name: str | None) -> None:
    """Write the tokenizer, checksum every file in `tmp`, write the manifest (`manifest` gives
    config, graph, precision, kv, ...; the format, tokenizer, files and provenance are added
    here, once for every exporter) and move the bundle into place."""
    (tmp / TOKENIZER_FILE).write_text(ckpt.tokenizer_json, encoding="utf-8")
    seal(tmp, out, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "edgert_version": __version__,
        **manifest,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "bos_token_id": ckpt.bos_token_id,
            "eos_token_ids": list(ckpt.eos_token_ids),
            "add_bos_token": ckpt.add_bos_token,
            "chat_template": ckpt.chat_template,
        },
        "provenance": ckpt.provenance,
    })


def seal(tmp: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Checksum every file assembled in `tmp` into the manifest's `files`, write the manifest
    and move the bundle into place (replacing `out`)."""
    manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                         for f in sorted(tmp.iterdir()) if f.name != MANIFEST}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
