"""Tool calls through chat templates that know tools: the real Qwen2.5, Qwen3, Llama 3.1 and
Llama 3.2 templates (as llama.cpp ships them for its own tests, read from the `llama-cpp-python`
sdist on the package registry, never committed here). Our renderer against transformers'
`apply_chat_template` on a whole tool round trip, each family's way of writing a call parsed
back, and the `openai` tool flow over a real socket with the real model wearing Qwen2.5's
template (SmolLM2 speaks ChatML too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest

from edgert.serve.tools import Tools, native, native_messages, parse_tools, tool_calls
from edgert.text.tokenizer import Tokenizer
from tests.test_server import openai_over
from tests.test_tools import TRAINS, WEATHER

SDIST = "llama-cpp-python==0.3.36"  # the peer scripts/bench_vs_llamacpp.py builds
LLAMA = Path(__file__).resolve().parents[1] / ".cache" / "llamacpp"
TEMPLATES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
}
ROUND_TRIP = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_7", "type": "function",
        "function": {"name": "get_weather",
                     "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": '{"temperature": 21}'},
]


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    sdists = sorted(LLAMA.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        LLAMA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:",
                        "--no-deps", "-q", "-d", str(LLAMA)], check=True)
        sdists = sorted(LLAMA.glob("llama_cpp_python-*.tar.gz"))
    out = {}
    with tarfile.open(sdists[-1]) as t:
        for key, name in TEMPLATES.items():
            member = next(m for m in t.getmembers()
                          if m.name.endswith("/vendor/llama.cpp/models/templates/" + name))
            f = t.extractfile(member)
            assert f is not None
            out[key] = f.read().decode()
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(smollm2_bundle)


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_round_trip_renders_as_transformers_does(family, templates, tokenizer, smollm2_bundle):
    """The tool list, the assistant's call and the tool's result, rendered by our sandboxed
    jinja exactly as transformers renders them (its tokenizer, the same template)."""
    from transformers import PreTrainedTokenizerFast

    template = templates[family]
    assert native(template)
    tokenizer.chat_template = template
    tokenizer.__dict__.pop("_template", None)  # the compiled template is cached per tokenizer
    tools = [WEATHER, TRAINS]
    ours = tokenizer.apply_chat_template(native_messages(ROUND_TRIP), True, tools=tools)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_bundle.tokenizer_path),
                                 bos_token=tokenizer.id_to_token(tokenizer.bos_token_id))
    hf.chat_template = template
    ref = hf.apply_chat_template(native_messages(ROUND_TRIP), tools=tools, tokenize=False,
                                 add_generation_prompt=True)
    assert ours == ref
    # the template saw all of it: the functions, the call's arguments, the result
    for needle in ("get_weather", "next_train", "Paris", "temperature"):
        assert needle in ours, (family, needle)


TOOLS = Tools((WEATHER["function"], TRAINS["function"]), "auto")


@pytest.mark.parametrize("reply", [
    # Qwen2.5 / Qwen3 / Hermes: tagged JSON, one per call
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
    '</tool_call>',
    # Llama 3.1 / 3.2 custom tools: bare JSON with "parameters"
    '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
])
def test_each_family_writes_calls_we_parse(reply):
    calls = tool_calls(reply, TOOLS)
    assert calls is not None and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}


def test_two_tagged_calls_and_an_unlisted_function():
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
           '</tool_call>\n<tool_call>{"name": "next_train", "arguments": {"destination": '
           '"Bergen", "after_hour": 9}}</tool_call>')
    assert [c["function"]["name"] for c in tool_calls(two, TOOLS)] == ["get_weather",
                                                                      "next_train"]
    assert tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', TOOLS) is None


@pytest.fixture(scope="module")
def qwen_client(smollm2_bundle, templates, tmp_path_factory):
    """SmolLM2 with Qwen2.5's template: a hard-linked copy of the bundle whose manifest names
    the other template (the checksummed files are the same)."""
    root = tmp_path_factory.mktemp("native")
    bundle = root / "smollm2-qwen-template"
    shutil.copytree(smollm2_bundle.path, bundle, copy_function=os.link)
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.unlink()  # a link: never write through it into the cached bundle
    manifest["tokenizer"]["chat_template"] = templates["qwen2.5"]
    manifest_path.write_text(json.dumps(manifest))
    with openai_over(bundle, root / "s.sock") as c:
        yield c


def test_openai_flow_through_a_native_template(qwen_client):
    """A named call (arguments constrained to the schema), its result fed back as `role:
    tool` through Qwen's <tool_response>, and the model answers in words."""
    c, model = qwen_client
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = c.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER, TRAINS], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    follow = [*ask, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = c.chat.completions.create(model=model, messages=follow, tools=[WEATHER, TRAINS],
                                   tool_choice="none", temperature=0, max_tokens=24)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
