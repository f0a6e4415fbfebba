"""Bundles: the CLI writes them, `edgert info` reads them, and a damaged one is refused with a
message naming the problem (never a crash inside ONNX Runtime)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edgert.bundle import DEFAULT_BLOCK_SIZE, Bundle, BundleError
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_tiny("llama", root / "hf")
    out = root / "b"
    proc = subprocess.run([sys.executable, "-m", "edgert", "export", str(root / "hf"), "-o",
                           str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "KV per token" in proc.stdout
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_info_cli(tiny_bundle):
    proc = subprocess.run([sys.executable, "-m", "edgert", "info", str(tiny_bundle)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for word in ("llama: 2 layers", "4 heads / 2 KV heads", "fp32", "model.onnx.data",
                 "tokenizer.json", "weights", "KV per token"):
        assert word in proc.stdout
    import onnxruntime as ort

    cuda = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("cuda "))
    assert ("CUDAExecutionProvider" in ort.get_available_providers()) == (
        cuda.split()[-1] == "available"), cuda
    assert any(ln.split() == ["cpu", "available"] for ln in proc.stdout.splitlines())


def test_manifest_records_what_the_runtime_needs(tiny_bundle):
    m = Bundle.load(tiny_bundle).manifest
    assert m["graph"]["opset"] == 21 and m["precision"] == "fp32"
    assert m["kv"]["null_block"] == 0 and m["kv"]["block_size"] == DEFAULT_BLOCK_SIZE == 32
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert m["provenance"]["kind"] == "hf"
    assert len(m["graph"]["pools"]) == 2


def test_edited_weights_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    data = b / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF  # same size, one byte flipped
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model\.onnx\.data: sha256 does not match"):
        Bundle.load(b)


def test_truncated_weights_refused_even_without_hashing(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    data = b / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"model\.onnx\.data: size"):
        Bundle.load(b, verify=False)


def test_missing_tokenizer_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json listed in the manifest is missing"):
        Bundle.load(b)


def test_other_format_version_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99"):
        Bundle.load(b)


def test_not_a_bundle_refused(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_cli_reports_corruption_cleanly(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / "tokenizer.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "edgert", "info", str(b)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tiny_bundle, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgert", "export", str(tmp_path / "nope"),
                           "-o", str(out / "b")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    assert list(out.iterdir()) == []
