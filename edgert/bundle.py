"""The model bundle as the runtime sees it: a directory with manifest.json, model.onnx (+ external
data) and tokenizer.json. Loading verifies the format version and every file's sha256 before
anything is handed to a backend, so a corrupt or foreign bundle fails with a message naming the
problem instead of as a crash deep inside ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.model_config import ModelConfig

FORMAT = "edgert-bundle"
FORMAT_VERSION = 2  # 2: pools [num_blocks, kv_heads, block_size, head_dim]; tables cover new tokens
# The KV block size an export records as the bundle's default (tokens per block; `edgert serve
# --block-size` overrides it). 32, not 16: each layer's gather copies one slice per (block, kv
# head), and on 2 Zen 3 cores (avx2) a SmolLM2 int8 decode step over the same 224 tokens of past
# took 0.89-0.94x the time at 16 rows and 0.98x at one, prefill unchanged (README: Benchmarks).
# The price is coarser prefix reuse: a cached prefix is shared in whole blocks of 32 tokens.
DEFAULT_BLOCK_SIZE = 32
MANIFEST = "manifest.json"
PAGED = "paged"  # graph.convention of native bundles (absent from older manifests)
DENSE_PAST = "dense-past"  # optimum's past_key_values graphs (runner/dense_backend.py)


class BundleError(ValueError):
    """The bundle cannot be used; the message says which file and why."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])

    @property
    def graph(self) -> dict[str, Any]:
        return self.manifest["graph"]

    @property
    def convention(self) -> str:
        """How the graph takes its KV cache: "paged" (the native graph, DESIGN.md) or
        "dense-past" (an optimum export, run by runner/dense_backend.py on the same pool)."""
        return str(self.graph.get("convention", PAGED))

    def require_paged(self, what: str) -> None:
        """Refuse a dense-past bundle where only the paged-KV graph can work."""
        if self.convention != PAGED:
            raise BundleError(
                f"{self.path}: {what} needs a paged-KV graph; this bundle's graph takes a "
                f"{self.convention} KV cache (exported --via optimum) and runs only on the CPU "
                "provider through the dense adapter (re-export --via native where the "
                "architecture has a native builder)")

    @property
    def model_path(self) -> Path:
        return self.path / self.graph["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    @property
    def kv(self) -> dict[str, Any]:
        return self.manifest["kv"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    def weights_bytes(self) -> int:
        return sum(f["bytes"] for name, f in self.manifest["files"].items()
                   if name.startswith(Path(self.graph["file"]).stem))

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle. `verify` hashes every file (about 1 s per 500 MB)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle directory")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: no {MANIFEST}; is this an edgert bundle?")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an edgert bundle manifest (format != {FORMAT!r})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {version!r}, this edgert reads version "
                f"{FORMAT_VERSION}; re-export the model with this edgert version")
        for key in ("config", "graph", "tokenizer", "kv", "files", "precision"):
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest lacks {key!r}")
        for name, info in manifest["files"].items():
            fpath = path / name
            if not fpath.is_file():
                raise BundleError(f"{path}: file {name} listed in the manifest is missing")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise BundleError(
                    f"{fpath}: size {size} bytes, manifest says {info['bytes']}: file is corrupt")
            if verify and sha256_file(fpath) != info["sha256"]:
                raise BundleError(f"{fpath}: sha256 does not match the manifest: file is corrupt")
        for needed in (manifest["graph"]["file"], manifest["tokenizer"]["file"]):
            if needed not in manifest["files"]:
                raise BundleError(f"{mpath}: {needed} is not covered by the manifest's checksums")
        try:
            ModelConfig.from_dict(manifest["config"])
        except TypeError as e:
            raise BundleError(f"{mpath}: config does not match this edgert version ({e})") from None
        return cls(path, manifest)
