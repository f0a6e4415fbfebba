"""The runtime core on the real SmolLM2 bundle: continuous batching equals sequential decoding,
preemption under a small pool, prefix caching, seeded sampling, forks, cancellation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgert.core.scheduler import RequestRejected, child_seed
from edgert.engine import LLM, EngineConfig, LLMEngine
from edgert.outputs import TokenLogprob
from edgert.sampling_params import SamplingParams
from edgert.tools.evaluate import GraphScorer

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


@pytest.fixture(scope="module")
def scorer(smollm2_bundle) -> GraphScorer:
    """The teacher-forced reference of `edgert eval`: a whole sequence through the graph in one
    call, with none of the engine's scheduler, pool, chunking, prefix cache or sampler."""
    return GraphScorer.from_bundle(smollm2_bundle, threads=2)


TOL = 1e-4  # nats


def _reference(scorer: GraphScorer, ids: list[int]) -> np.ndarray:
    """Row i: the log-softmax the model gives ids[i + 1] after ids[: i + 1]."""
    return scorer.logprobs(np.asarray(ids), 0)


def _assert_like_reference(lp: TokenLogprob, token: int, row: np.ndarray, k: int,
                           where: str) -> None:
    """`lp` scores `token` as the reference row does, and its alternatives are the row's k most
    likely tokens with their logprobs, most likely first."""
    assert lp.token_id == token, where
    assert lp.logprob == pytest.approx(float(row[token]), abs=TOL), where
    assert len(lp.top) == k, (where, lp.top)
    if not k:
        return
    values = list(lp.top.values())
    assert values == sorted(values, reverse=True), (where, lp.top)
    for t, v in lp.top.items():
        assert v == pytest.approx(float(row[t]), abs=TOL), (where, t, lp.top)
    outside = np.delete(row, list(lp.top))
    assert outside.max() <= values[-1] + TOL, (where, "a likelier token is missing", lp.top)


def test_batched_equals_sequential(llm, alone, smollm2_bundle):
    engine = _engine(smollm2_bundle)
    outs = _run_staggered(engine, PROMPTS, GREEDY, arrive_every=2)
    assert engine.stats.max_decode_batch >= 4  # really batched
    for p in PROMPTS:  # the graph is batch-invariant: exactly the same tokens
        assert outs[p] == alone[p], p
    assert engine.pool_usage().used == 0


# SmolLM2-135M: K and V of 30 layers x 3 heads x 64, fp32, in blocks of 16 tokens (the tests below
# were sized for them; bundles default to 32)
SMALL_BLOCK = 16
PER_BLOCK = 2 * 30 * 3 * 64 * 4 * SMALL_BLOCK


def test_small_pool_waits_and_preempts_yet_completes(llm, alone, smollm2_bundle):
    """A pool of 10 blocks x 16 tokens cannot hold 8 sequences of ~40 tokens: requests wait and
    running ones are preempted and recomputed (with the prefix cache on, so a recomputation is
    served from the blocks it left behind); every output is still exactly the greedy one."""
    engine = _engine(smollm2_bundle, kv_memory=11 * PER_BLOCK, block_size=SMALL_BLOCK,
                     enable_prefix_caching=True)
    assert engine.block_bytes == PER_BLOCK and engine.allocator.usage().total == 10
    outs = _run_staggered(engine, PROMPTS, GREEDY, arrive_every=1)
    assert engine.stats.preemptions > 0
    assert engine.allocator.stats.prefix_hit_tokens > 0  # a recomputation reused its blocks
    for p in PROMPTS:
        assert outs[p] == alone[p], p
    usage = engine.pool_usage()
    assert usage.used == 0 and usage.free + usage.cached == usage.total


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
    """n=3 forks after the prompt and shares its blocks copy-on-write (the prompt ends inside a
    block, so each choice's first token goes into its own copy of the shared one). Greedy
    choices are all the greedy continuation; sampled choice i is, token for token and logprob for
    logprob, the n = 1 request under child_seed(seed, i): a choice that read another's KV, or
    wrote into a block it shares, would not be."""
    assert llm.engine.allocator.enable_prefix_caching
    res = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, n=3))[0]
    assert [c.token_ids for c in res.choices] == [alone[PROMPTS[0]]] * 3
    prompt = PROMPTS[1]
    assert len(llm.tokenizer.encode(prompt)) % llm.engine.block_size != 0
    params = SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7, logprobs=1)
    want = []
    for i in range(3):  # before the fork runs: nothing it could have corrupted is reused
        ch = llm.generate(prompt, replace(params, n=1, seed=child_seed(7, i)))[0].choices[0]
        want.append((ch.token_ids, ch.logprobs))
    res = llm.generate(prompt, params)[0]
    assert [(c.token_ids, c.logprobs) for c in res.choices] == want
    assert len({tuple(ids) for ids, _ in want}) == 3  # the seeds differ
    assert llm.engine.pool_usage().used == 0


def test_cancel_mid_stream_frees_blocks(alone, smollm2_bundle):
    """Aborting one of two running requests frees exactly its blocks at once; the other runs on
    to exactly its greedy answer."""
    engine = _engine(smollm2_bundle)
    keep = engine.add_request(PROMPTS[1], GREEDY)
    gone = engine.add_request(PROMPTS[4], SamplingParams(max_tokens=200, temperature=0))
    kept: list[int] = []
    for _ in range(6):
        kept += [t for o in engine.step() if o.request_id == keep for t in o.token_ids]
    used_before = engine.pool_usage().used
    victim = next(s for s in engine.scheduler.running if s.request_id == gone)
    table = engine.allocator.block_table(victim.seq_id)
    assert table
    outs = engine.abort(gone)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.pool_usage().used == used_before - len(table)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
            kept += out.token_ids
    assert kept == alone[PROMPTS[1]]
    assert engine.pool_usage().used == 0


def test_stop_strings_and_max_tokens(llm, alone):
    text = llm.tokenizer.decode(alone[PROMPTS[2]])
    stop = text.strip().split()[1][:3]
    res = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert res.choices[0].finish_reason == "stop"
    assert res.text == text[:text.index(stop)]  # everything before the stop string, no more
    res = llm.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0))[0]
    assert res.choices[0].finish_reason == "length" and res.token_ids == alone[PROMPTS[2]][:5]


def test_prompt_logprobs_match_logits(llm, scorer):
    """Every prompt position's logprob and top-5 alternatives equal the teacher-forced
    reference's, for a short prompt and for one longer than the step's budget of 128 tokens
    (prefilled in chunks: the last row of a chunk scores the first token of the next), whose
    prefix is also in the prefix cache (prompt logprobs need every position: no hit may skip
    one). The token generated after the prompt is the reference's argmax."""
    short = "The quick brown fox jumps over the lazy dog"
    long = " ".join(f"Step {i}: add {i * 7 % 13} to the total, then carry on." for i in range(24))
    llm.generate(long, SamplingParams(max_tokens=1, temperature=0))  # its blocks are cached now
    for prompt in (short, long):
        calls = llm.engine.stats.prefill_calls
        res = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0,
                                                  prompt_logprobs=5))[0]
        ids, lps = res.prompt_token_ids, res.prompt_logprobs
        if prompt is long:
            assert len(ids) > 2 * 128
            assert llm.engine.stats.prefill_calls - calls >= 3  # really chunked
        ref = _reference(scorer, ids + res.token_ids)
        assert lps[0] is None and len(lps) == len(ids)
        for i in range(1, len(ids)):
            _assert_like_reference(lps[i], ids[i], ref[i - 1], 5, f"prompt token {i}")
        assert res.token_ids == [int(np.argmax(ref[-1]))]


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


def test_logprobs_are_log_softmax(llm, scorer):
    """Each generated token's logprob and top-3 are the normalised log-softmax the reference
    computes (unnormalised logits would also be <= 0 with the greedy pick on top: only the
    reference can tell them apart), for greedy and for sampled tokens."""
    for params in (SamplingParams(max_tokens=6, temperature=0, logprobs=3),
                   SamplingParams(max_tokens=6, temperature=1.3, seed=3, logprobs=3)):
        res = llm.generate(PROMPTS[0], params)[0]
        n = len(res.prompt_token_ids)
        ref = _reference(scorer, res.prompt_token_ids + res.token_ids)
        lps = res.choices[0].logprobs
        assert len(lps) == len(res.token_ids) == 6
        for j, (tok, lp) in enumerate(zip(res.token_ids, lps)):
            _assert_like_reference(lp, tok, ref[n - 1 + j], 3, f"token {j}, {params}")
            if params.greedy:
                assert tok == int(np.argmax(ref[n - 1 + j]))


def test_seeded_sampling_survives_preemption(llm, smollm2_bundle):
    """Random numbers are keyed by (seed, step): a sequence preempted and recomputed (prefix cache
    on) samples the same tokens with the same logprobs as one that never was, and so does each
    choice of an n = 3 request, forked choices included: choice i is the n = 1 request under
    child_seed(seed, i)."""
    prompts = PROMPTS[:6]
    params = [SamplingParams(max_tokens=16, temperature=0.8, seed=100 + i, logprobs=1)
              for i in range(len(prompts))]
    params[3] = replace(params[3], n=3)  # the youngest choices are preempted first
    want: dict[tuple[int, int], list] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):  # one at a time, nothing preempted
        for c in range(sp.n):
            ch = llm.generate(p, replace(sp, n=1, seed=child_seed(sp.seed, c)))[0].choices[0]
            want[i, c] = list(zip(ch.token_ids, ch.logprobs))
    engine = _engine(smollm2_bundle, kv_memory=9 * PER_BLOCK, block_size=SMALL_BLOCK,
                     enable_prefix_caching=True)
    rids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, params))}
    preempted, schedule = [], engine.scheduler.schedule

    def spy():
        plan = schedule()
        preempted.extend((rids[s.request_id], s.index) for s in plan.preempted if s.output_ids)
        return plan

    engine.scheduler.schedule = spy
    got: dict[tuple[int, int], list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault((rids[out.request_id], out.index), []).extend(
                zip(out.token_ids, out.logprobs))
    assert engine.stats.preemptions > 0
    assert any(i == 3 and c > 0 for i, c in preempted), preempted  # a forked choice, mid-output
    assert engine.allocator.stats.prefix_hit_tokens > 0  # a recomputation reused its blocks
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
    assert len({tuple(t for t, _ in want[3, c]) for c in range(3)}) == 3  # the seeds differ
    assert engine.pool_usage().used == 0


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


def test_async_engine_streams_and_cancels(llm, smollm2_bundle):
    import asyncio

    from edgert.engine.async_engine import AsyncEngine

    params = SamplingParams(max_tokens=12, temperature=0)
    want = llm.generate(PROMPTS[0], params)[0].text

    async def main():
        aengine = AsyncEngine(_engine(smollm2_bundle))
        aengine.start()
        try:
            deltas = []
            async for out in aengine.generate(aengine.tokenizer.encode(PROMPTS[0]), params):
                deltas.append(out.text)
            assert len(deltas) > 3 and "".join(deltas) == want
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
