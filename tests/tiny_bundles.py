"""Tiny random bundles for the deploy, pack and fleet tests: a real export of a tiny Llama, and
a broken copy whose checksums are right but whose graph is garbage, so a service dies before
READY=1 and the release must be rolled back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def make_bundle(root: Path, name: str, seed: int) -> Path:
    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from tests.tiny_models import make_tiny

    _, ckpt = make_tiny("llama", root / f"hf-{name}", seed=seed)
    return Path(write_bundle(load_source(ckpt), root / name, progress=False, name=name))


def rewrite_file(bundle: Path, name: str, data: bytes) -> None:
    """Replace (or add) a file and its manifest entry: a valid-checksummed bundle."""
    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def broken_copy(bundle: Path, dest: Path) -> Path:
    """`bundle` under the name `dest.name`, its model.onnx replaced by random bytes."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["name"] = dest.name
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    rewrite_file(dest, "model.onnx", os.urandom(4096))
    return dest
