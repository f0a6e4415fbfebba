"""A request's output constraint -> one llguidance grammar.

The OpenAI way (`response_format`: `json_object`, `json_schema`) on both routes, and vLLM's
extensions for what JSON cannot say: `guided_json`, `guided_regex`, `guided_choice` (one of
several strings) and `guided_grammar` (Lark). At most one per request. A malformed value is a
400 naming its field here; a grammar that cannot be compiled for the model's tokenizer is a 400
naming the compiler's reason (ParseContext.check_grammar), before anything is queued.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from edgert.serve.openai_protocol import ApiError, invalid

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def grammar_of(body: dict[str, Any], check: Callable[[str], None] | None) -> str | None:
    given = [f for f in FIELDS if body.get(f) is not None
             and body.get(f) != {"type": "text"}]
    if not given:
        return None
    if len(given) > 1:
        raise ApiError(400, f"{given[0]} and {given[1]}: give at most one output constraint",
                       given[1], "invalid_value")
    name = given[0]
    return _checked(name, _build(name, body[name]), check)


def schema_grammar(name: str, schema: dict[str, Any],
                   check: Callable[[str], None] | None) -> str:
    """A JSON schema's grammar, checked; errors name `name` (e.g. a tool's parameters)."""
    return _checked(name, _schema(name, schema), check)


def _checked(name: str, grammar: str, check: Callable[[str], None] | None) -> str:
    if check is not None:
        try:
            check(grammar)
        except ValueError as e:
            raise ApiError(400, f"{name}: cannot be compiled: {e}", name,
                           "invalid_value") from None
    return grammar


def _build(name: str, value: Any) -> str:
    import llguidance

    ll = llguidance.LLMatcher
    if name == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("json_object",
                                                                   "json_schema"):
            raise invalid(name, 'type must be "text", "json_object" or "json_schema"')
        if value["type"] == "json_object":
            return _schema(name, {"type": "object"})
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise invalid(name, "json_schema must be an object with a schema object")
        return _schema(name, spec["schema"])
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise invalid(name, f"is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise invalid(name, "must be a JSON schema object")
        return _schema(name, value)
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise invalid(name, "must be a non-empty regular expression")
        return ll.grammar_from_regex(value)
    if name == "guided_choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise invalid(name, "must be a non-empty array of non-empty strings")
        return ll.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if not isinstance(value, str) or not value:
        raise invalid(name, "must be a Lark grammar")
    return ll.grammar_from_lark(value)


# Whitespace between JSON tokens as the model likes to write it (newlines, indentation), but
# bounded: llguidance's default `[ \t\n\r]+` lets a small model pad forever instead of closing.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,16}"}


def _schema(name: str, schema: dict[str, Any]) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise invalid(name, f"not a usable JSON schema: {e}") from None
