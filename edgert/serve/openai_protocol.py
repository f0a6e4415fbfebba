"""The OpenAI-compatible request bodies, parsed strictly (responses.py builds the answers).

Parsing rules, chosen so a client never gets silently wrong output:
- a field of the OpenAI API that edgert implements is type- and range-checked (400 naming it);
- a field of the OpenAI API that edgert does not implement is a 400 naming it, unless it holds
  the value that means "off" (logit_bias: {}, functions: [], audio: null, ...);
- OpenAI fields with no effect on the output (user, metadata, store, ...) are accepted;
- anything else is foreign to the API: ignored and logged once per name, as vLLM does, so
  clients that send their own extras keep working.
Nothing here touches the engine or the network: it maps JSON to SamplingParams, which keeps it
testable on its own.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgert.sampling_params import ParamError, SamplingParams
from edgert.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_PROMPTS = 128  # prompts in one /v1/completions body (each becomes an engine request)
_INT64 = 1 << 63
_MAX_STOP_TOKEN_IDS = 256


class ApiError(Exception):
    """An error answered with OpenAI's JSON error body."""

    _TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
              405: "invalid_request_error", 413: "invalid_request_error",
              422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": self._TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


# ---- field tables ----------------------------------------------------------------------------

# OpenAI fields edgert cannot honour, with the predicate that says the value means "off".
def _null(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


_UNSUPPORTED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "suffix": _empty,
    "logit_bias": _empty,
}
_UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "functions": _empty,
    "function_call": lambda v: v is None or v == "none",
    "logit_bias": _empty,
    "audio": _null,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _null,
    "web_search_options": _null,
    "reasoning_effort": _null,
    "verbosity": _null,
}
# OpenAI fields that do not change the output: accepted, no effect.
_NO_EFFECT = {"user", "metadata", "store", "service_tier", "prompt_cache_key",
              "safety_identifier"}
# The sampling fields shared by both routes, OpenAI's and vLLM-style extensions.
_SAMPLING = {"model", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
             "max_tokens", "frequency_penalty", "presence_penalty", "top_k", "min_p",
             "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens",
             "include_stop_str_in_output", "priority", "speculative_tokens",
             "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "logprobs", "best_of",
                                  "add_special_tokens"}
_CHAT_FIELDS = _SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                            "add_generation_prompt", "tools", "tool_choice",
                            "parallel_tool_calls"}


class ForeignFieldLog:
    """Warn once per unknown field name; bounded, so hostile bodies full of fresh names can
    neither grow memory nor flood the log."""

    def __init__(self, limit: int = 256):
        self._seen: set[str] = set()
        self._limit = limit

    def note(self, route: str, name: str) -> None:
        if name in self._seen or len(self._seen) >= self._limit:
            return
        self._seen.add(name)
        log.warning("%s: ignoring field %r, which is not part of the OpenAI API", route,
                    name[:64])


# ---- typed getters ---------------------------------------------------------------------------

def _opt_int(body: dict[str, Any], name: str, lo: int = -_INT64,
             hi: int = _INT64 - 1) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(name, f"must be an integer, got {_kind(v)}")
    if not lo <= v <= hi:
        raise invalid(name, f"must be in [{lo}, {hi}]")
    return v


def _int(body: dict[str, Any], name: str, default: int, lo: int = -_INT64,
         hi: int = _INT64 - 1) -> int:
    v = _opt_int(body, name, lo, hi)
    return default if v is None else v


def _float(body: dict[str, Any], name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise invalid(name, f"must be a number, got {_kind(v)}")
    try:
        f = float(v)
    except OverflowError:
        raise invalid(name, "is out of range") from None
    if not math.isfinite(f):
        raise invalid(name, "must be finite")
    return f


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"must be a boolean, got {_kind(v)}")
    return v


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return list(v)
    raise invalid("stop", "must be a string or an array of strings")


def _stop_token_ids(body: dict[str, Any]) -> list[int]:
    v = body.get("stop_token_ids")
    if v is None:
        return []
    if (not isinstance(v, list) or len(v) > _MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _INT64
                       for t in v)):
        raise invalid("stop_token_ids",
                      f"must be an array of at most {_MAX_STOP_TOKEN_IDS} token ids")
    return list(v)


# ---- parsed requests -------------------------------------------------------------------------

@dataclass
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions body, ready for the engine."""

    kind: Literal["completion", "chat"]
    model: str
    prompts: list[list[int]]  # token ids, one engine request each
    prompt_texts: list[str]  # for echo
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    drop_output: bool = False  # echo with max_tokens 0: run one token and drop it (vLLM)
    logprobs: int | None = None  # top alternatives per token; None: no logprobs in the answer
    tools: Any = None  # serve.tools.Tools when the reply may be a function call
    request_id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ParseContext:
    """What parsing needs from the server: the model's names and limits and its tokenizer."""

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int
    max_total_tokens: Callable[[int], int]  # n -> prompt + output tokens the pool can hold
    foreign: ForeignFieldLog = field(default_factory=ForeignFieldLog)
    # Raises ValueError naming why a grammar cannot constrain this model (Grammars.check).
    check_grammar: Callable[[str], None] | None = None


def _check_fields(body: dict[str, Any], route: str, known: set[str],
                  unsupported: dict[str, Callable[[Any], bool]], ctx: ParseContext) -> None:
    for name, value in body.items():
        if name in known or name in _NO_EFFECT:
            continue
        off = unsupported.get(name)
        if off is not None:
            if not off(value):
                raise ApiError(400, f"{name}: not supported by this server", name,
                               "unsupported_parameter")
            continue
        ctx.foreign.note(route, name)


def _check_model(body: dict[str, Any], ctx: ParseContext) -> str:
    model = body.get("model")
    if model is None:
        return ctx.model_name
    if not isinstance(model, str):
        raise invalid("model", f"must be a string, got {_kind(model)}")
    if model != ctx.model_name:
        raise ApiError(404, f"The model {model[:200]!r} does not exist; this server serves "
                            f"{ctx.model_name!r}", "model", "model_not_found")
    return model


def _sampling(body: dict[str, Any], max_tokens: int, logprobs: int | None,
              prompt_logprobs: int | None, field_names: dict[str, str],
              ctx: ParseContext, call_schema: dict[str, Any] | None = None) -> SamplingParams:
    from edgert.serve.guided import grammar_of, schema_grammar

    seed = _opt_int(body, "seed")
    grammar = grammar_of(body, ctx.check_grammar)
    if call_schema is not None:  # a required tool call: its JSON, arguments by their schema
        if grammar is not None:
            raise invalid("tool_choice", "a required tool call cannot take another output "
                                         "constraint")
        grammar = schema_grammar("tools", call_schema, ctx.check_grammar)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_float(body, "temperature", 1.0),
            top_p=_float(body, "top_p", 1.0),
            top_k=_int(body, "top_k", 0, -1),
            min_p=_float(body, "min_p", 0.0),
            repetition_penalty=_float(body, "repetition_penalty", 1.0),
            presence_penalty=_float(body, "presence_penalty", 0.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0),
            # OpenAI seeds are any int64; the sampler keys on [0, 2**63).
            seed=None if seed is None else seed % _INT64,
            n=_int(body, "n", 1),
            stop=_stop(body),
            stop_token_ids=_stop_token_ids(body),
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
            priority=_int(body, "priority", 0),
            speculative_tokens=_opt_int(body, "speculative_tokens"),
            grammar=grammar,
        )
    except ParamError as e:
        name = field_names.get(e.field, e.field)
        raise ApiError(400, f"{name}: {str(e).split(': ', 1)[-1]}", name,
                       "invalid_value") from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise invalid("stream_options", f"must be an object, got {_kind(opts)}")
    if not stream:
        raise invalid("stream_options", "is only allowed when stream is true")
    return stream, _bool(opts, "include_usage", False)


def _max_tokens(body: dict[str, Any], names: Sequence[str], default: int,
                lo: int) -> tuple[str, int]:
    for name in names:
        v = _opt_int(body, name, lo)
        if v is not None:
            return name, v
    return names[-1], default


def parse_completion(body: dict[str, Any], ctx: ParseContext) -> GenerationRequest:
    _check_fields(body, "/v1/completions", _COMPLETION_FIELDS, _UNSUPPORTED_COMPLETION, ctx)
    model = _check_model(body, ctx)
    stream, include_usage = _stream_flags(body)
    echo = _bool(body, "echo", False)
    logprobs = _opt_int(body, "logprobs", 0, 20)
    n = _int(body, "n", 1)
    best_of = _opt_int(body, "best_of")
    if best_of is not None and best_of != n:
        raise ApiError(400, "best_of: only best_of == n is supported", "best_of",
                       "unsupported_parameter")
    _, max_tokens = _max_tokens(body, ["max_tokens"], 16, 0)
    if max_tokens == 0 and not echo:
        raise invalid("max_tokens", "must be >= 1 (0 is only allowed with echo)")
    texts, prompts = _completion_prompts(body.get("prompt"), ctx.tokenizer,
                                         _bool(body, "add_special_tokens", True))
    params = _sampling(body, max(1, max_tokens), logprobs,
                       logprobs if echo and logprobs is not None else None,
                       {"prompt_logprobs": "logprobs"}, ctx)
    return GenerationRequest("completion", model, prompts, texts, params, stream, include_usage,
                             echo=echo, drop_output=max_tokens == 0, logprobs=logprobs)


def _completion_prompts(prompt: Any, tok: Tokenizer,
                        add_special_tokens: bool) -> tuple[list[str], list[list[int]]]:
    """OpenAI's four prompt forms: a string, an array of strings, an array of token ids, an
    array of arrays of token ids."""
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid("prompt", "must be a string, an array of strings or an array of "
                                "token-id arrays, and not empty")
    if len(items) > MAX_PROMPTS:
        raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request")
    texts, ids = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            ids.append(_encode(tok, item, add_special_tokens, "prompt"))
        elif isinstance(item, list) and all(_is_token(t) for t in item):
            ids.append(list(item))
            texts.append("")  # decoded lazily, for echo only
        else:
            raise invalid("prompt", "must be a string, an array of strings or an array of "
                                    "token-id arrays")
    return texts, ids


def _encode(tok: Tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    except Exception:  # tokenizers refuses str it cannot encode (lone surrogates)
        raise invalid(param, "is not valid Unicode text") from None


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def parse_chat(body: dict[str, Any], ctx: ParseContext) -> GenerationRequest:
    from edgert.text.tokenizer import ChatTemplateError

    _check_fields(body, "/v1/chat/completions", _CHAT_FIELDS, _UNSUPPORTED_CHAT, ctx)
    model = _check_model(body, ctx)
    stream, include_usage = _stream_flags(body)
    want_logprobs = _bool(body, "logprobs", False)
    top = _opt_int(body, "top_logprobs", 0, 20)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    from edgert.serve import tools as fc

    messages = parse_messages(body.get("messages"))
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    tools = fc.parse_tools(body)
    try:
        if fc.native(ctx.tokenizer.chat_template):
            text = ctx.tokenizer.apply_chat_template(
                fc.native_messages(messages), add_generation_prompt,
                tools=[{"type": "function", "function": f} for f in tools.functions]
                if tools else None)
        else:
            text = ctx.tokenizer.apply_chat_template(fc.fallback_messages(messages, tools),
                                                     add_generation_prompt)
    except ChatTemplateError as e:
        raise ApiError(422, f"messages: {e}", "messages", "chat_template_error") from None
    except Exception as e:  # a template is code from the bundle; any failure is the input's
        raise ApiError(422, f"messages: chat template failed: {e}", "messages",
                       "chat_template_error") from None
    ids = _encode(ctx.tokenizer, text, False, "messages")
    n = _int(body, "n", 1)
    # No max_tokens: as much as the model length and the pool allow (vLLM's rule), at least 1
    # so that a prompt that is already too long gets the engine's "prompt too long" error.
    room = min(ctx.max_model_len, ctx.max_total_tokens(max(1, min(n, 16)))) - len(ids)
    name, max_tokens = _max_tokens(body, ["max_completion_tokens", "max_tokens"],
                                   max(1, room), 1)
    logprobs = (top or 0) if want_logprobs else None
    params = _sampling(body, max_tokens, logprobs, None,
                       {"max_tokens": name, "logprobs": "top_logprobs"}, ctx,
                       tools.call_schema() if tools and tools.forced else None)
    return GenerationRequest("chat", model, [ids], [text], params, stream, include_usage,
                             logprobs=logprobs, tools=tools)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier calls, as sent back by a client: id, name, arguments (a JSON
    string, as OpenAI sends them)."""
    if not isinstance(calls, list):
        raise invalid(where, "must be an array")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise invalid(f"{where}[{j}]", 'must be {"id", "type": "function", "function": '
                                           '{"name", "arguments"}}')
        args = f.get("arguments", "{}")
        if not isinstance(args, str):
            raise invalid(f"{where}[{j}].function.arguments", "must be a JSON string")
        out.append({"id": str(c.get("id") or ""), "type": "function",
                    "function": {"name": f["name"], "arguments": args}})
    return out


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: role and string content (text parts are
    joined), names kept. Tool and multimodal content is refused by name."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty array of message objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "must be an object")
        role = m.get("role")
        if role == "function":
            raise ApiError(400, f"{where}.role: 'function' messages are deprecated; use 'tool'",
                           f"{where}.role", "unsupported_parameter")
        if not isinstance(role, str) or role not in _ROLES:
            raise invalid(f"{where}.role",
                          "must be one of system, developer, user, assistant, tool")
        for key in ("function_call", "audio", "refusal"):
            if not _empty(m.get(key)):
                raise ApiError(400, f"{where}.{key}: not supported by this server",
                               f"{where}.{key}", "unsupported_parameter")
        calls = m.get("tool_calls")
        if not _empty(calls) and role != "assistant":
            raise invalid(f"{where}.tool_calls", "only assistant messages make tool calls")
        content = m.get("content")
        msg: dict[str, Any] = {"role": _ROLES[role], "content": "" if content is None and (
            calls or role == "assistant") else _content(content, where)}
        if not _empty(calls):
            msg["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.tool_call_id", "is required for a tool message")
            msg["tool_call_id"] = call_id
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name", "must be a string")
            msg["name"] = name
        out.append(msg)
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise invalid(f"{where}.content[{j}]", "must be an object")
            kind = part.get("type")
            if kind != "text":
                if isinstance(kind, str):
                    raise ApiError(400, f"{where}.content[{j}].type: {kind[:64]!r} content is "
                                        "not supported (text only)",
                                   f"{where}.content[{j}].type", "unsupported_parameter")
                raise invalid(f"{where}.content[{j}].type", "must be a string")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.content[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise invalid(f"{where}.content", "must be a string or an array of text parts")


def parse_tokenize(body: dict[str, Any], ctx: ParseContext) -> list[int]:
    """vLLM's /tokenize: {"prompt": str, "add_special_tokens": bool} or {"messages": [...],
    "add_generation_prompt": bool}."""
    if "messages" in body:
        messages = parse_messages(body.get("messages"))
        add_generation_prompt = _bool(body, "add_generation_prompt", True)
        try:
            text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt)
        except Exception as e:  # a template is code from the bundle; any failure is the input's
            raise ApiError(422, f"messages: chat template failed: {e}", "messages",
                           "chat_template_error") from None
        return _encode(ctx.tokenizer, text, False, "messages")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", "must be a string (or send messages)")
    return _encode(ctx.tokenizer, prompt, _bool(body, "add_special_tokens", True), "prompt")
