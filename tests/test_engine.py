"""The runtime core on the real SmolLM2 bundle: continuous batching equals sequential decoding,
preemption under a small pool, prefix caching, seeded sampling, forks, cancellation."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.core.scheduler import RequestRejected
from edgert.engine import LLM, EngineConfig, LLMEngine
from edgert.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def quicksort(arr):",
    "List three colours:",
    "The three laws of thermodynamics state that energy cannot be created or destroyed, "
    "entropy of an isolated system never decreases, and",
    "Q: What is 12 times 12?\nA:",
    "import numpy as np\n\n# Compute the mean of a list\n",
    "Water boils at",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def _engine(bundle, **kw) -> LLMEngine:
    cfg = dict(kv_memory=64 << 20, max_num_seqs=16, max_num_batched_tokens=128,
               verify_bundle=False)
    cfg.update(kw)
    return LLMEngine(bundle, EngineConfig(**cfg))


@pytest.fixture(scope="module")
def llm(smollm2_bundle) -> LLM:
    return LLM(smollm2_bundle, EngineConfig(kv_memory=64 << 20, verify_bundle=False,
                                            max_num_batched_tokens=128))


@pytest.fixture(scope="module")
def alone(llm) -> dict[str, list[int]]:
    """Each prompt's greedy continuation, run on its own."""
    return {p: llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS}


def _run_staggered(engine: LLMEngine, prompts, params, arrive_every: int = 2):
    """Add one request every `arrive_every` steps, step until all finish."""
    ids, outs, pending = {}, {}, list(prompts)
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            p = pending.pop(0)
            ids[engine.add_request(p, params)] = p
        for out in engine.step():
            outs.setdefault(ids[out.request_id], []).extend(out.token_ids)
        step += 1
    return outs


def _near_tie(llm: LLM, prompt: str, tokens: list[int], k: int) -> float:
    """Teacher-forced gap between the two best logits at step k of `tokens`."""
    ids = llm.tokenizer.encode(prompt) + tokens[:k]
    res = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=2))[0]
    top = sorted(res.choices[0].logprobs[0].top.values(), reverse=True)
    return top[0] - top[1]


def _assert_same_or_near_tie(llm, prompt, got, want):
    if got == want:
        return
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    gap = _near_tie(llm, prompt, want, k)
    print(f"{prompt[:30]!r}: differs at token {k}, teacher-forced top-2 gap {gap:.2e}")
    assert gap <= 1e-4, f"{prompt!r}: batched differs from alone at token {k} (gap {gap:.2e})"


def test_batched_equals_sequential(llm, alone, smollm2_bundle):
    engine = _engine(smollm2_bundle)
    outs = _run_staggered(engine, PROMPTS, GREEDY, arrive_every=2)
    assert engine.stats.max_decode_batch >= 4  # really batched
    for p in PROMPTS:
        _assert_same_or_near_tie(llm, p, outs[p], alone[p])
    assert engine.pool_usage().used == 0


def test_small_pool_waits_and_preempts_yet_completes(llm, alone, smollm2_bundle):
    """A pool of 10 blocks x 16 tokens cannot hold 8 sequences of ~40 tokens: requests wait and
    running ones are preempted and recomputed; every output is still the greedy one."""
    per_block = 2 * 30 * 3 * 64 * 4 * 16
    engine = _engine(smollm2_bundle, kv_memory=11 * per_block, enable_prefix_caching=False)
    assert engine.allocator.usage().total == 10
    outs = _run_staggered(engine, PROMPTS, GREEDY, arrive_every=1)
    assert engine.stats.preemptions > 0
    for p in PROMPTS:
        _assert_same_or_near_tie(llm, p, outs[p], alone[p])
    usage = engine.pool_usage()
    assert usage.used == 0 and usage.free == usage.total


def test_prefix_cache_reuses_system_prompt(smollm2_bundle):
    engine = _engine(smollm2_bundle)
    tok = engine.tokenizer
    system = ("You are a careful assistant for a factory floor robot. Always answer with short, "
              "precise sentences, never speculate, and say when you do not know. ") * 4
    sys_ids = tok.encode(system)[:100]
    assert len(sys_ids) == 100
    question = tok.encode(" Question: how many wheels does a bicycle have? Answer:")
    prompt = sys_ids + question
    cold = LLM.__new__(LLM)
    cold.engine, cold.tokenizer = _engine(smollm2_bundle, enable_prefix_caching=False), tok
    want = cold.generate([prompt], GREEDY)[0].token_ids

    def run(ids):
        before = engine.stats.prefill_tokens
        rid = engine.add_request(ids, GREEDY)
        got, metrics = [], None
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == rid
                got.extend(out.token_ids)
                metrics = out.metrics or metrics
        return got, engine.stats.prefill_tokens - before, metrics

    first, computed1, m1 = run(prompt)
    second, computed2, m2 = run(prompt)
    assert computed1 == len(prompt) and m1.cached_prompt_tokens == 0
    bs = engine.block_size
    cached = (len(prompt) - 1) // bs * bs  # whole blocks, at least one token left to compute
    assert m2.cached_prompt_tokens == cached
    assert computed2 == len(prompt) - cached
    assert first == want and second == want
    assert engine.allocator.stats.prefix_hit_tokens >= cached


def test_seeded_sampling_reproducible_batched_and_alone(llm, smollm2_bundle):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    alone = llm.generate(PROMPTS[0], params)[0].token_ids
    engine = _engine(smollm2_bundle)
    mixed = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    rids = {}
    for i, p in enumerate(mixed):
        rids[engine.add_request(p, params if i == 1 else SamplingParams(
            max_tokens=12, temperature=1.0, seed=i))] = i
    got = []
    while engine.has_unfinished():
        for out in engine.step():
            if rids[out.request_id] == 1:
                got.extend(out.token_ids)
    assert got == alone
    other_seed = llm.generate(PROMPTS[0], SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, seed=99))[0].token_ids
    assert other_seed != alone  # the seed matters


def test_top_k_one_is_greedy(llm, alone):
    got = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=1.5, top_k=1,
                                                  seed=5))[0].token_ids
    assert got == alone[PROMPTS[2]]


def test_n_choices_share_the_prompt(llm, alone):
    """n=3 forks after the prompt (copy-on-write of the shared last block); greedy choices are
    all the greedy continuation, sampled ones differ from each other."""
    res = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, n=3))[0]
    assert [c.token_ids for c in res.choices] == [alone[PROMPTS[0]]] * 3
    res = llm.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, n=3,
                                                  seed=7))[0]
    assert len({tuple(c.token_ids) for c in res.choices}) == 3
    assert llm.engine.pool_usage().used == 0


def test_cancel_mid_stream_frees_blocks(smollm2_bundle):
    engine = _engine(smollm2_bundle)
    keep = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=30, temperature=0))
    gone = engine.add_request(PROMPTS[4], SamplingParams(max_tokens=200, temperature=0))
    for _ in range(6):
        engine.step()
    used_before = engine.pool_usage().used
    table = engine.allocator.block_table(engine.scheduler.running[1].seq_id)
    outs = engine.abort(gone)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.pool_usage().used == used_before - len(table)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
    assert engine.pool_usage().used == 0


def test_stop_strings_and_max_tokens(llm, alone):
    text = llm.tokenizer.decode(alone[PROMPTS[2]])
    stop = text.strip().split()[1][:3]
    res = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert res.choices[0].finish_reason == "stop"
    assert stop not in res.text and text.startswith(res.text)
    res = llm.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0))[0]
    assert res.choices[0].finish_reason == "length" and len(res.token_ids) == 5


def test_prompt_logprobs_match_logits(llm):
    prompt = "The quick brown fox jumps over the lazy dog"
    res = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0,
                                              prompt_logprobs=1))[0]
    lps = res.prompt_logprobs
    ids = res.prompt_token_ids
    assert lps[0] is None and len(lps) == len(ids)
    assert all(lp.token_id == t for lp, t in zip(lps[1:], ids[1:]))
    assert all(lp.logprob <= 0 for lp in lps[1:])
    # " dog" after "lazy" is very likely; a random token is not
    assert lps[-1].logprob > -3


def test_impossible_requests_rejected_at_once(smollm2_bundle):
    engine = _engine(smollm2_bundle, kv_memory=4 << 20)
    with pytest.raises(RequestRejected, match="KV blocks"):
        engine.add_request(list(range(10, 500)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="model length"):
        _engine(smollm2_bundle, max_model_len=64).add_request(
            list(range(10, 70)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="token ids"):
        engine.add_request([10**6], SamplingParams())
    assert not engine.has_unfinished()


def test_timeout_finishes_request(smollm2_bundle):
    engine = _engine(smollm2_bundle)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=500, temperature=0,
                                                         ignore_eos=True, timeout=0.3))
    reasons = []
    while engine.has_unfinished():
        reasons += [o.finish_reason for o in engine.step() if o.request_id == rid and o.finished]
    assert reasons == ["timeout"]
    assert engine.pool_usage().used == 0


def test_logprobs_are_log_softmax(llm):
    res = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=3))[0]
    for lp in res.choices[0].logprobs:
        assert lp.top and max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-5)
        assert np.all(np.array(list(lp.top.values())) <= 0)


def test_seeded_sampling_survives_preemption(llm, smollm2_bundle):
    """Random numbers are keyed by (seed, step): a sequence preempted and recomputed samples the
    same tokens as one that never was."""
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i) for i in range(6)]
    want = [llm.generate(p, sp)[0].token_ids for p, sp in zip(PROMPTS[:6], params)]
    per_block = 2 * 30 * 3 * 64 * 4 * 16
    engine = _engine(smollm2_bundle, kv_memory=9 * per_block, enable_prefix_caching=False)
    rids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(zip(PROMPTS[:6], params))}
    got: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(rids[out.request_id], []).extend(out.token_ids)
    assert engine.stats.preemptions > 0
    assert [got[i] for i in range(6)] == want


def test_priority_and_fcfs(smollm2_bundle):
    """With one sequence slot, waiting requests run by priority (lower first), then arrival."""
    engine = _engine(smollm2_bundle, max_num_seqs=1)
    order = []
    rids = {}
    for name, prio in [("first", 0), ("low", 5), ("high", -1), ("second", 0)]:
        rids[engine.add_request(PROMPTS[3], SamplingParams(max_tokens=2, temperature=0,
                                                           priority=prio))] = name
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                order.append(rids[out.request_id])
    assert order == ["high", "first", "second", "low"]


def test_async_engine_streams_and_cancels(smollm2_bundle):
    import asyncio

    from edgert.engine.async_engine import AsyncEngine

    async def main():
        aengine = AsyncEngine(_engine(smollm2_bundle))
        aengine.start()
        try:
            deltas = []
            async for out in aengine.generate(aengine.tokenizer.encode(PROMPTS[0]),
                                              SamplingParams(max_tokens=12, temperature=0)):
                deltas.append(out.text)
            assert len(deltas) > 3 and "".join(deltas).strip()
            agen = aengine.generate(aengine.tokenizer.encode(PROMPTS[1]),
                                    SamplingParams(max_tokens=400, temperature=0,
                                                   ignore_eos=True))
            n = 0
            async for _ in agen:
                n += 1
                if n == 5:
                    break
            await agen.aclose()  # the client went away: the request is aborted
            for _ in range(100):
                if aengine.engine.pool_usage().used == 0 and not aengine.engine.num_requests:
                    break
                await asyncio.sleep(0.05)
            assert aengine.engine.pool_usage().used == 0
            assert aengine.alive
        finally:
            await aengine.stop()

    asyncio.run(main())
