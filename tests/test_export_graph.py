"""The exported paged-KV graph against transformers' forward pass (a reference nobody here wrote),
on tiny random Llama / Qwen2 / Qwen3 checkpoints, plus the graph's structural rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgert.bundle import Bundle
from export.bundle_writer import write_bundle
from export.pipeline import load_source
from tests.paged_runner import PagedRunner
from tests.tiny_models import VOCAB, make_tiny, reference_logits

ATOL = 1e-4
ARCHS = ["llama", "llama-mha", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, ckpt_dir = make_tiny(arch, root / "hf", tie=(arch == "qwen3"))
    bundle = Bundle.load(write_bundle(load_source(ckpt_dir), root / "bundle", progress=False))
    return arch, model, bundle


def test_prefill_then_decode_matches_transformers(tiny):
    """Every prefill length 1..40, then 20 decode steps through the pool (block size 4, shuffled
    blocks full of garbage): logits equal transformers' within 1e-4 at every position."""
    arch, model, bundle = tiny
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, VOCAB, size=60)]
    ref = reference_logits(model, ids)
    assert np.abs(ref).max() > 1.0  # a reference far from trivial
    runner = PagedRunner(bundle, block_size=4, num_blocks=40, seed=7)
    worst = 0.0
    for n in range(1, 41):
        got = [runner.run([(0, ids[:n])])[0]]
        for t in range(n, n + 20):
            got.append(runner.run([(0, [ids[t]])])[0])
        runner.release(0)
        diff = np.abs(np.concatenate(got) - ref[: n + 20]).max()
        worst = max(worst, diff)
        assert diff <= ATOL, f"{arch}: prefill {n}: max abs diff {diff}"
    print(f"{arch}: worst max abs diff {worst:.2e}")


def test_three_sequences_in_one_call(tiny):
    """S=3 per call with different context and query lengths (one starting from context 0, one
    with query_len < T, padding everywhere), mixed prefill chunks and decode steps."""
    arch, model, bundle = tiny
    rng = np.random.default_rng(2)
    seqs = {sid: [int(t) for t in rng.integers(0, VOCAB, size=48)] for sid in range(4)}
    refs = {sid: reference_logits(model, toks) for sid, toks in seqs.items()}
    runner = PagedRunner(bundle, block_size=4, num_blocks=64, seed=3)
    done = dict.fromkeys(seqs, 0)
    # (sid, chunk) triples per call; sequence 3 only joins on the third call (context 0 then).
    schedule = [
        [(0, 9), (1, 2), (2, 5)],
        [(0, 1), (1, 7), (2, 1)],
        [(0, 1), (3, 11), (2, 1)],
        [(1, 1), (3, 1), (0, 6)],
        [(2, 0), (3, 3), (1, 1)],  # sequence 2 in the batch with nothing new
        *[[(0, 1), (1, 1), (3, 1)] for _ in range(10)],
    ]
    checked = 0
    for call in schedule:
        batch = [(sid, seqs[sid][done[sid]: done[sid] + n]) for sid, n in call]
        outs = runner.run(batch)
        for (sid, n), out in zip(call, outs):
            ref = refs[sid][done[sid]: done[sid] + n]
            assert out.shape == ref.shape
            if n:
                diff = np.abs(out - ref).max()
                assert diff <= ATOL, f"{arch}: seq {sid} at {done[sid]}: {diff}"
                checked += n
            done[sid] += n
    assert checked > 60


def test_graph_structure(tiny):
    """Each pool's only consumer is its GatherND; standard ONNX domain only; int32 index inputs;
    weights in external data."""
    _, _, bundle = tiny
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx"), f"non-standard op {node.domain}:{node.op_type}"
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    pools = [n for pair in bundle.graph["pools"] for n in pair]
    assert len(pools) == 2 * bundle.config.num_layers
    for pool in pools:
        assert consumers.get(pool) == ["GatherND"], f"{pool} consumed by {consumers.get(pool)}"
    int32 = onnx.TensorProto.INT32
    for inp in model.graph.input:
        if inp.name in bundle.graph["inputs"].values():
            assert inp.type.tensor_type.elem_type == int32, inp.name
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
        bundle.graph["opset"]]
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big, "weights must be stored as external data"
