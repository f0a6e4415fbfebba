"""Function calling: the `openai` package's tool flow against a real server over the socket with
the real model (SmolLM2's template has no tool support, so the documented fallback prompt is
used): a required call and a named one come back as `tool_calls` whose arguments validate
against the function's schema (jsonschema), streamed and whole; the tool's result goes back as a
`role: tool` message and the model answers. Plus the parsing and rendering rules on their own."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from edgert.serve.tools import Tools, fallback_messages, native, parse_tools, tool_calls
from tests.test_server import openai_over

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TRAINS = {"type": "function", "function": {
    "name": "next_train", "description": "The next train to a destination",
    "parameters": {"type": "object", "properties": {
        "destination": {"type": "string", "maxLength": 32},
        "after_hour": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["destination", "after_hour"]}}}


@pytest.fixture(scope="module")
def client(smollm2_bundle, tmp_path_factory):
    with openai_over(smollm2_bundle.path, tmp_path_factory.mktemp("tools") / "s.sock") as c:
        yield c


def _args(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_and_named_calls_then_the_result_goes_back(client):
    c, model = client
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = c.chat.completions.create(model=model, messages=ask, tools=[WEATHER, TRAINS],
                                  tool_choice="required", temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "next_train")
    _args(call, WEATHER if call.function.name == "get_weather" else TRAINS)

    named = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "When is the next train to York?"}],
        tools=[WEATHER, TRAINS], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "next_train"}})
    ncall = named.choices[0].message.tool_calls[0]
    assert ncall.function.name == "next_train"
    _args(ncall, TRAINS)

    # the round trip: the call, its result as a tool message, the model's answer
    follow = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(
            {"city": "Paris", "temperature": 18, "unit": "celsius", "sky": "sunny"})}]
    final = c.chat.completions.create(model=model, messages=follow, tools=[WEATHER],
                                      tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip()


def test_streamed_call_and_auto(client):
    c, model = client
    stream = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80, stream=True)
    name, args, finish = "", "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or ():
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    # auto: the model decides; whatever it does comes back well formed
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], tools=[WEATHER],
        tool_choice="auto", temperature=0, max_tokens=30)
    msg = r.choices[0].message
    if msg.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        _args(msg.tool_calls[0], WEATHER)
    else:
        assert msg.content and r.choices[0].finish_reason in ("stop", "length")


def test_bad_tool_requests_are_400(client):
    c, model = client
    cases = [dict(tools=[{"type": "function"}]), dict(tools=[WEATHER], tool_choice="always"),
             dict(tools=[WEATHER], tool_choice={"type": "function",
                                                "function": {"name": "nope"}}),
             dict(tools=[WEATHER, WEATHER])]
    for kw in cases:
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=model, max_tokens=4, messages=[
                {"role": "user", "content": "x"}], **kw)


def test_parsing_and_rendering_rules():
    tools = parse_tools({"tools": [WEATHER, TRAINS]})
    assert isinstance(tools, Tools) and tools.choice == "auto"
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    bare = tool_calls('{"name": "get_weather", "arguments": {"city": "Rome", "unit": '
                      '"celsius"}}', tools)
    assert bare and json.loads(bare[0]["function"]["arguments"])["city"] == "Rome"
    tagged = tool_calls('<tool_call>\n{"name": "next_train", "arguments": {"destination": '
                        '"Hull", "after_hour": 9}}\n</tool_call>\n<tool_call>{"name": '
                        '"get_weather", "arguments": {}}</tool_call>', tools)
    assert [c["function"]["name"] for c in tagged] == ["next_train", "get_weather"]
    assert tool_calls('{"name": "launch_rocket", "arguments": {}}', tools) is None
    assert tool_calls("Hello there", tools) is None
    msgs = fallback_messages([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "", "tool_calls": [
                                  {"id": "call_1", "type": "function", "function": {
                                      "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
                             tools)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.")
    assert '"name": "next_train"' in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {"name": "get_weather",
                                              "arguments": {"city": "Rome"}}
    assert msgs[3] == {"role": "user", "content": "Result of function get_weather: 18C"}
    assert native("{% if tools %}{{ tools | tojson }}{% endif %}") and not native("{{ x }}")
