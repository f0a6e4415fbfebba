"""Function calling in chat completions: `tools`, `tool_choice`, `tool_calls`, `role: tool`.

A template that knows tools (Qwen2.5, the Llama 3.1 family: it reads a `tools` variable) gets
them natively: the tool list, the assistant's `tool_calls` and the `tool` messages go through
it unchanged. A template that does not (SmolLM2) gets the documented fallback: a system message
listing each function's name, description and JSON schema and asking for a reply that is only
`{"name": ..., "arguments": {...}}`; an assistant's earlier calls are rendered as that JSON and
a tool's result as a user message naming the function.

When a call is required (`tool_choice: "required"` or a named function) the reply is constrained
to exactly that JSON, arguments validated by the function's own schema (llguidance); with
`auto` the model chooses, and a reply that parses as a call of a listed function (bare JSON, or
inside `<tool_call>` tags as Qwen writes it) becomes one. `none` disables the tools.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from edgert.serve.openai_protocol import ApiError, invalid

FALLBACK = ("You can call these functions. To call one, reply with only a JSON object of the "
            'form {{"name": <function name>, "arguments": <arguments object>}} and nothing '
            "else. Otherwise answer normally.\nFunctions:\n{functions}")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict[str, Any], ...]  # OpenAI's {"name", "description", "parameters"}
    choice: str  # "auto", "required", or the one function's name

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def call_schema(self) -> dict[str, Any]:
        """The JSON a required call must be: one of the allowed functions with its arguments."""
        def one(f: dict[str, Any]) -> dict[str, Any]:
            return {"type": "object", "additionalProperties": False,
                    "required": ["name", "arguments"],
                    "properties": {"name": {"const": f["name"]},
                                   "arguments": f.get("parameters") or {"type": "object"}}}

        allowed = [f for f in self.functions if self.choice in ("required", f["name"])]
        return one(allowed[0]) if len(allowed) == 1 else {"anyOf": [one(f) for f in allowed]}


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """None when no tool can be called (no tools, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "is only allowed when tools are given")
        return None
    if not isinstance(tools, list):
        raise invalid("tools", "must be an array of function tools")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise invalid(f"tools[{i}]", 'must be {"type": "function", "function": {...}}')
        if not isinstance(f.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}",
                                                                   f["name"]):
            raise invalid(f"tools[{i}].function.name", "must be 1-64 letters, digits, _ . -")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid(f"tools[{i}].function.parameters", "must be a JSON schema object")
        functions.append({"name": f["name"], "description": str(f.get("description") or ""),
                          "parameters": params or {"type": "object", "properties": {}}})
    if len({f["name"] for f in functions}) != len(functions):
        raise invalid("tools", "function names must be unique")
    if choice is None or choice == "auto":
        return Tools(tuple(functions), "auto")
    if choice == "none":
        return None
    if choice == "required":
        return Tools(tuple(functions), "required")
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", 'must be "none", "auto", "required" or '
                                     '{"type": "function", "function": {"name": ...}}')
    if name not in {f["name"] for f in functions}:
        raise ApiError(400, f"tool_choice: no tool named {name[:64]!r}", "tool_choice",
                       "invalid_value")
    return Tools(tuple(functions), name)


def native(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support: earlier calls' arguments as objects (the
    templates serialise them with tojson)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {
                "name": c["function"]["name"],
                "arguments": _loads(c["function"]["arguments"])}} for c in m["tool_calls"]]}
        out.append(m)
    return out


def fallback_messages(messages: list[dict[str, Any]], tools: Tools | None
                      ) -> list[dict[str, Any]]:
    """Messages for a template without tool support (module docstring). A result names the
    function its call id belongs to (OpenAI's tool messages carry only the id)."""
    called = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
    out = []
    for m in messages:
        if m["role"] == "tool":
            name = m.get("name") or called.get(m.get("tool_call_id", "")) or m.get("tool_call_id")
            out.append({"role": "user", "content": f"Result of function {name}: {m['content']}"})
        elif m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _loads(c["function"]["arguments"])} for c in m["tool_calls"]]
            text = "\n".join(json.dumps(c) for c in calls)
            out.append({"role": "assistant", "content": (m["content"] + "\n" + text).strip()})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if tools is None:
        return out
    listing = "\n".join(json.dumps(f) for f in tools.functions)
    system = FALLBACK.format(functions=listing)
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": out[0]["content"] + "\n\n" + system}, *out[1:]]
    return [{"role": "system", "content": system}, *out]


def _loads(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def tool_calls(text: str, tools: Tools) -> list[dict[str, Any]] | None:
    """The calls in a reply, in OpenAI's shape, or None when the reply is not a call of a
    listed function."""
    found = [m.group(1) for m in _TAGGED.finditer(text)] or [text.strip()]
    calls = []
    for raw in found:
        obj = _loads(raw)
        if not isinstance(obj, dict) or obj.get("name") not in tools.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(args, dict):
            return None
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    return calls
