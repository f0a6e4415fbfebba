"""Prompt-lookup speculative decoding never changes an answer: greedy and seeded sampling, with
penalties, logprobs, stop rules and max_tokens, give token for token what plain decoding gives,
while the model confirms guesses (checked through the engine's counters and /metrics). The fast
tier runs on a tiny random Llama; the real model checks a quoting workload."""

from __future__ import annotations

from dataclasses import replace

import httpx
import numpy as np
import pytest

from edgert.config import EngineConfig
from edgert.core.prompt_lookup import propose
from edgert.engine.llm_engine import LLMEngine
from edgert.sampling_params import SamplingParams
from tests.test_server import ServerProcess, metric, metric_samples

# ---- the proposer ------------------------------------------------------------------------------


def test_propose_takes_the_latest_longest_match():
    ids = [5, 6, 7, 1, 2, 9, 5, 6, 7, 3, 4, 8, 6, 7]
    assert propose(ids, 2, min_n=2, max_n=3) == [3, 4]  # "6 7" last seen before "3 4"
    assert propose(ids, 5, min_n=1, max_n=1) == [3, 4, 8, 6, 7]  # "7": its latest occurrence
    assert propose([1, 2, 3, 4], 3, min_n=2) == []  # nothing repeats
    assert propose([4, 4, 4], 2, min_n=2) == [4]  # a run: the run continues
    assert propose([1], 3) == [] and propose(ids, 0) == []


def test_propose_prefers_longer_ngrams():
    # "2 3" is followed by 7 most recently, but "1 2 3" (longer) by 9
    ids = [1, 2, 3, 9, 0, 2, 3, 7, 1, 2, 3]
    assert propose(ids, 1, min_n=2, max_n=3) == [9]
    assert propose(ids, 1, min_n=2, max_n=2) == [7]


# ---- the engine, fast tier ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny random Llama whose attention is weak (o_proj scaled down), so its greedy output
    soon cycles and prompt lookup guesses right; attention still moves every logit, so a guess
    whose K/V went wrong would show in the logprobs."""
    import torch

    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from tests.tiny_models import make_tiny

    root = tmp_path_factory.mktemp("spec")
    model, ckpt = make_tiny("llama", root / "hf", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(ATTENTION_SCALE)
    model.save_pretrained(ckpt, safe_serialization=True)
    return write_bundle(load_source(ckpt), root / "bundle", progress=False, name="tiny-spec")


ATTENTION_SCALE = 0.01


def _run(bundle, config: EngineConfig, jobs: list[tuple[list[int], SamplingParams]]):
    engine = LLMEngine(bundle, config)
    ids = [engine.add_request(p, sp) for p, sp in jobs]
    outs: dict[str, list] = {i: [[], [], None] for i in ids}
    for _ in range(5000):  # a bookkeeping bug must fail, not hang
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs[o.request_id][0].extend(o.token_ids)
            outs[o.request_id][1].extend(
                (lp.token_id, lp.logprob, sorted(lp.top.items())) for lp in o.logprobs or ())
            if o.finished:
                outs[o.request_id][2] = o.finish_reason
    assert not engine.has_unfinished(), "the engine never finished"
    return [tuple(map(tuple, outs[i][:2])) + (outs[i][2],) for i in ids], engine.stats


def _jobs(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(0)
    loop = rng.integers(3, vocab, 12).tolist()
    prompt = loop * 4 + loop[:5]  # the model has seen what follows many times
    return [
        (prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=11,
                                ignore_eos=True, logprobs=2)),
        (prompt, SamplingParams(max_tokens=33, temperature=0, repetition_penalty=1.2,
                                presence_penalty=0.3, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)),
    ]


def test_speculation_reproduces_plain_decoding(tiny_bundle):
    """One request at a time (speculation's regime) and all at once (where it stays out of the
    way by default), against plain decoding of the same requests."""
    from edgert.bundle import Bundle

    vocab = Bundle.load(tiny_bundle).config.vocab_size
    jobs = _jobs(vocab)
    base = EngineConfig(kv_memory=8 << 20, max_model_len=256)
    first = _run(tiny_bundle, base, jobs[:1])[0][0][0]
    jobs.append((jobs[0][0], replace(jobs[0][1], stop_token_ids=[first[20]])))
    plain = [_run(tiny_bundle, base, [j])[0][0] for j in jobs]
    spec = replace(base, speculative_tokens=4)
    accepted = drafted = 0
    for job, want in zip(jobs, plain):
        got, stats = _run(tiny_bundle, spec, [job])
        assert got[0] == want, job[1]
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
        assert stats.accepted_tokens <= stats.draft_tokens
    assert drafted > 0 and accepted > 0, (drafted, accepted)
    # a request may ask for it itself, and opt out of a server default
    own = [(p, replace(sp, speculative_tokens=3)) for p, sp in jobs[:2]]
    got, stats = _run(tiny_bundle, base, own[:1])
    assert got[0] == plain[0] and stats.draft_tokens > 0
    got, stats = _run(tiny_bundle, spec, [(jobs[0][0], replace(jobs[0][1], speculative_tokens=0))])
    assert got[0] == plain[0] and stats.draft_tokens == 0
    # batched: several decoders, nobody speculates with speculative_max_seqs = 1, or all do
    got, _ = _run(tiny_bundle, spec, jobs)
    assert got == plain
    got, stats = _run(tiny_bundle, replace(spec, speculative_max_seqs=8), jobs)
    assert got == plain and stats.draft_tokens > 0
    assert [g[2] for g in got] == ["length"] * 4 + ["stop"]


def test_speculation_frees_everything(tiny_bundle):
    """Rejected guesses leave no block behind: the pool is idle after the requests."""
    from edgert.bundle import Bundle

    vocab = Bundle.load(tiny_bundle).config.vocab_size
    engine = LLMEngine(tiny_bundle, EngineConfig(kv_memory=8 << 20, max_model_len=256,
                                                 speculative_tokens=6))
    for prompt, sp in _jobs(vocab)[:2]:
        engine.add_request(prompt, sp)
        while engine.has_unfinished():
            engine.step()
    usage = engine.pool_usage()
    assert usage.used == 0 and engine.stats.accepted_tokens > 0


# ---- the real model ----------------------------------------------------------------------------

DOCUMENT = ("The station opens at six. Trains to Leeds leave from platform four every half "
            "hour. Trains to York leave from platform two at ten past the hour. Bicycles may "
            "travel outside the morning peak. Refunds are given at the ticket office.")


def test_quoting_with_the_real_model_over_the_socket(smollm2_bundle, tmp_path):
    """A served request that quotes a document: the same text with and without speculation,
    and /metrics shows the guesses the model confirmed."""
    prompt = (f"<|im_start|>user\nRepeat this notice word for word:\n{DOCUMENT}<|im_end|>\n"
              "<|im_start|>assistant\n")
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0}
    server = ServerProcess(smollm2_bundle.path, tmp_path / "s.sock", "--speculative-tokens", "5")
    try:
        server.wait_healthy()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.sock)),
                          base_url="http://localhost", timeout=300) as c:
            spec = c.post("/v1/completions", json=body).json()
            plain = c.post("/v1/completions", json={**body, "speculative_tokens": 0}).json()
            bad = c.post("/v1/completions", json={**body, "speculative_tokens": 99})
            m = metric_samples(c.get("/metrics").text)
    finally:
        server.stop()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert "platform four" in spec["choices"][0]["text"]
    assert bad.status_code == 400 and "speculative_tokens" in bad.text
    drafted = metric(m, "edgert_spec_decode_draft_tokens_total")
    accepted = metric(m, "edgert_spec_decode_accepted_tokens_total")
    assert 0 < accepted <= drafted
    assert accepted >= 0.5 * 48 * 0.5, (accepted, drafted)  # quoting: most tokens are guessed
