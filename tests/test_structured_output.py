"""Constrained decoding with the real model over a real socket: 20 JSON schemas, greedy and
sampled, every output parses and validates (jsonschema is the judge); regex, choice and Lark
constraints; streaming; an unconstrained request answers the same whether or not constrained
ones share its batch; a constraint that cannot be compiled is a 400 naming the problem."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from tests.test_server import ServerProcess, metric, metric_samples, read_sse

S = {"type": "string", "maxLength": 24}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                          "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": S, "population": {"type": "integer",
                                                                 "minimum": 1}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
     "required": ["colour"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1,
                                               "maxItems": 4}},
     "required": ["tags"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": S},
     "required": ["ok", "reason"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -40,
                                                      "maximum": 60}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"first": S, "last": S},
        "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
     "minItems": 3, "maxItems": 3},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                          "maximum": 99}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"platform": {"type": "integer", "minimum": 1,
                                                   "maximum": 12},
                                      "destination": {"enum": ["Leeds", "York", "Hull"]}},
     "required": ["platform", "destination"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "unknown"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer",
                                                           "minimum": 1900,
                                                           "maximum": 2030}},
     "required": ["title", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "maxItems": 2}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"email": {"type": "string",
                                                "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"status": {"type": "string", "enum": ["open", "closed"]},
                                      "count": {"type": "integer", "minimum": 0,
                                                "maximum": 1000}},
     "required": ["status", "count"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "number"},
                                                 "minItems": 2, "maxItems": 5}},
     "required": ["values"]},
    {"type": "object", "properties": {"id": {"type": "integer"}, "label": S,
                                      "active": {"type": "boolean"}},
     "required": ["id", "label", "active"]},
    {"type": "object", "properties": {"kind": {"const": "event"}, "when": S},
     "required": ["kind", "when"]},
    {"type": "object", "properties": {"steps": {"type": "array", "items": {"enum": [
        "left", "right", "forward", "stop"]}, "minItems": 1, "maxItems": 6}},
     "required": ["steps"]},
]
assert len(SCHEMAS) == 20


@pytest.fixture(scope="module")
def server(smollm2_bundle, tmp_path_factory):
    srv = ServerProcess(smollm2_bundle.path, tmp_path_factory.mktemp("so") / "s.sock",
                        "--max-num-seqs", "16")
    srv.wait_healthy()
    yield srv
    assert srv.stop() == 0, srv.log


def _client(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(server.sock)),
                             base_url="http://localhost", timeout=600)


def _chat(schema: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Answer with JSON only, following this "
                          f"schema: {json.dumps(schema)}"}],
            "max_tokens": 200, "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": schema}}, **extra}


def test_twenty_schemas_greedy_and_sampled_all_validate(server):
    async def run() -> list[tuple[dict, dict]]:
        async with _client(server) as c:
            bodies = [_chat(s, temperature=0) for s in SCHEMAS] + [
                _chat(s, temperature=0.8, top_p=0.95, seed=i) for i, s in enumerate(SCHEMAS)]
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b)
                                        for b in bodies))
            return [(b, r.json()) for b, r in zip(bodies, rs)]

    for body, r in asyncio.run(run()):
        schema = body["response_format"]["json_schema"]["schema"]
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    # the schemas' keys and brackets were forced, not sampled one decode step at a time
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.sock)),
                      base_url="http://localhost") as c:
        m = metric_samples(c.get("/metrics").text)
    assert metric(m, "edgert_constrained_forced_tokens_total") > 40


def test_regex_choice_grammar_and_streaming(server):
    async def run() -> dict:
        async with _client(server) as c:
            prompt = "The train to Leeds leaves from platform"
            out = {}
            out["regex"] = (await c.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 20, "temperature": 0,
                "guided_regex": " [0-9]{1,2}\\."})).json()
            out["choice"] = (await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Is the sky blue? yes or no"}],
                "guided_choice": ["yes", "no"], "temperature": 0})).json()
            out["lark"] = (await c.post("/v1/completions", json={
                "prompt": "Count: ", "max_tokens": 40, "temperature": 0,
                "guided_grammar": 'start: num (", " num)~3\nnum: /[0-9]{1,3}/'})).json()
            async with c.stream("POST", "/v1/chat/completions", json=_chat(
                    SCHEMAS[0], temperature=0, stream=True)) as resp:
                events = await read_sse(resp)
            out["stream"] = "".join(e["choices"][0]["delta"].get("content", "")
                                    for e in events[:-1] if e.get("choices"))
            out["stream_whole"] = (await c.post("/v1/chat/completions", json=_chat(
                SCHEMAS[0], temperature=0))).json()
            return out

    out = asyncio.run(run())
    assert re.fullmatch(r" [0-9]{1,2}\.", out["regex"]["choices"][0]["text"]), out["regex"]
    assert out["choice"]["choices"][0]["message"]["content"] in ("yes", "no")
    assert out["choice"]["choices"][0]["finish_reason"] == "stop"
    lark = out["lark"]["choices"][0]["text"]
    assert re.fullmatch(r"[0-9]{1,3}(, [0-9]{1,3}){3}", lark), out["lark"]
    jsonschema.validate(json.loads(out["stream"]), SCHEMAS[0])
    assert out["stream"] == out["stream_whole"]["choices"][0]["message"]["content"]


def test_unconstrained_answers_do_not_depend_on_constrained_neighbours(server):
    plain = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
             for p in ("Once upon a time", "The best way to cook rice is", "def fib(n):")]

    async def run(with_constrained: bool) -> list[str]:
        async with _client(server) as c:
            extra = [c.post("/v1/chat/completions", json=_chat(s, temperature=0))
                     for s in SCHEMAS[:6]] if with_constrained else []
            rs = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in plain),
                                      *extra)
            return [r.json()["choices"][0]["text"] for r in rs[: len(plain)]]

    assert asyncio.run(run(True)) == asyncio.run(run(False))


def test_bad_constraints_are_400_naming_the_problem(server):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.sock)),
                      base_url="http://localhost", timeout=60) as c:
        def post(**body) -> httpx.Response:
            return c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})

        r = post(response_format={"type": "json_schema", "json_schema": {"schema": 3}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        r = post(response_format={"type": "xml"})
        assert r.status_code == 400 and "json_object" in r.json()["error"]["message"]
        r = post(guided_regex="([a-z]")
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
        assert "compiled" in r.json()["error"]["message"]
        r = post(guided_grammar="start: undefined_rule")
        assert r.status_code == 400 and "undefined_rule" in r.json()["error"]["message"]
        r = post(guided_regex="a", guided_choice=["a"])
        assert r.status_code == 400 and "at most one" in r.json()["error"]["message"]
        r = post(response_format={"type": "json_object"}, temperature=0, max_tokens=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert c.get("/ready").status_code == 200


def test_a_tokenizer_llguidance_cannot_take_refuses_constraints_only(tmp_path):
    """A word-level tokenizer (no byte decoder): the engine runs, plain requests work, a
    constrained one is refused with the reason instead of failing the server."""
    from edgert.engine.llm_engine import LLMEngine, RequestRejected
    from edgert.sampling_params import SamplingParams
    from edgert.serve.guided import grammar_of
    from tests.tiny_bundles import make_bundle

    engine = LLMEngine(make_bundle(tmp_path, "tiny", seed=1))
    grammar = grammar_of({"guided_regex": "[a-z]+"}, None)
    with pytest.raises(RequestRejected, match="cannot be constrained"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, grammar=grammar))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()


def test_a_grammar_the_vocabulary_cannot_spell_dead_ends_clearly(tmp_path):
    """A byte-level BPE tokenizer trained on lowercase text has no token for "Q" (no byte
    fallback): a regex that needs one can never be completed. The request finishes at once
    with finish_reason "grammar_dead_end" and no tokens (not a hang, not an empty "stop"),
    while a neighbour constrained to something spellable, and a plain one, carry on."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgert.bundle import Bundle
    from edgert.engine.llm_engine import LLMEngine
    from edgert.sampling_params import SamplingParams
    from edgert.serve.guided import grammar_of
    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from tests.tiny_models import VOCAB, make_tiny

    _, ckpt = make_tiny("llama", tmp_path / "hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = re.sub(r"[^a-z ]+", " ", " ".join(topics.values()).lower())
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=[], special_tokens=["<s>", "</s>"],
        show_progress=False))
    assert tok.get_vocab_size() <= VOCAB and tok.token_to_id("Q") is None
    tok.save(str(ckpt / "tokenizer.json"))
    bundle = Bundle.load(write_bundle(load_source(ckpt), tmp_path / "b", progress=False))
    engine = LLMEngine(bundle)
    prompt = tok.encode("the cat").ids
    rids = {engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                      grammar=grammar_of({"guided_regex": g},
                                                                         None))): g
            for g in ("Q+", "[a-z]{3}")}
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)  # runs to length
    rids[engine.add_request(prompt, plain)] = "plain"
    done, tokens = {}, {g: [] for g in rids.values()}
    for _ in range(50):
        for out in engine.step():
            tokens[rids[out.request_id]] += out.token_ids  # deltas
            if out.finished:
                done[rids[out.request_id]] = out.finish_reason
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished(), "a dead-ended grammar must not hang the engine"
    assert done["Q+"] == "grammar_dead_end" and not tokens["Q+"]
    assert done["[a-z]{3}"] == "stop"
    assert re.fullmatch("[a-z]{3}", tok.decode(tokens["[a-z]{3}"]))
    assert done["plain"] == "length" and len(tokens["plain"]) == 4
    assert engine.pool_usage().used == 0
