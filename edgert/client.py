"""A small Python client for `edgert serve`, over the Unix socket or TCP.

    from edgert.client import Client
    with Client("/run/edgert/edgert.sock") as c:
        print(c.chat("Say hi", max_tokens=32).text)
        for delta in c.stream("Once upon a time", max_tokens=64):
            print(delta, end="")

The same calls work over TCP with `Client("http://127.0.0.1:8000")`. Extra keyword arguments go
into the request body unchanged (temperature, seed, stop, ignore_eos, logprobs, ...), so every
server-side option is reachable without the client having to know it. Errors are typed by what
the caller can do about them: fix the request (BadRequest), retry later (Overloaded, honouring
retry_after; Unavailable), or fix permissions (PermissionDenied).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

_DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class EdgertError(Exception):
    """The server answered with an error (or could not be reached: status None)."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class BadRequest(EdgertError):
    """400/404/405/413/422: the request itself is wrong; `param` names the field."""


class PermissionDenied(EdgertError):
    """403: this uid/gid is not on the server's allow-list."""


class Overloaded(EdgertError):
    """429: too many waiting requests; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(EdgertError):
    """503 (loading, draining, engine down) or the server could not be reached."""


@dataclass
class Completion:
    text: str  # the first choice's text
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    choices: list[str] = field(default_factory=list)  # every choice's text, by index
    raw: dict[str, Any] = field(default_factory=dict)  # the server's JSON answer


def _raise_for(resp: httpx.Response, body: bytes) -> None:
    if resp.status_code < 400:
        return
    try:
        err = json.loads(body)["error"]
        message, param, code = str(err.get("message")), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param, code = body.decode(errors="replace")[:500], None, None
    kw: dict[str, Any] = {"status": resp.status_code, "param": param, "code": code}
    if resp.status_code == 429:
        retry = resp.headers.get("Retry-After")
        raise Overloaded(message, float(retry) if retry and retry.isdigit() else None, **kw)
    if resp.status_code == 403:
        raise PermissionDenied(message, **kw)
    if resp.status_code >= 500:
        raise Unavailable(message, **kw)
    raise BadRequest(message, **kw)


def _completion(data: dict[str, Any]) -> Completion:
    choices = data.get("choices") or []
    texts = [c.get("text") if "text" in c else (c.get("message") or {}).get("content") or ""
             for c in choices]
    usage = data.get("usage") or {}
    return Completion(texts[0] if texts else "",
                      choices[0].get("finish_reason") if choices else None,
                      int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                      texts, data)


def _chat_body(messages: str | list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"messages": messages, **params}


def _stream_request(prompt: str | list[int] | None, messages: str | list[dict[str, Any]] | None,
                    params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if (prompt is None) == (messages is None):
        raise ValueError("stream() takes a prompt or messages=, not both")
    if params.get("n", 1) != 1:
        raise ValueError("stream() yields one choice's text; use n=1")
    extra = {"stream": True, "stream_options": {"include_usage": True}}
    if messages is not None:
        return "/v1/chat/completions", {**_chat_body(messages, params), **extra}
    return "/v1/completions", {"prompt": prompt, **params, **extra}


class _StreamState:
    """Parses the SSE lines of one stream; `usage` and `finish_reason` are set at the end."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            cls = Overloaded if err.get("code") == "queue_full" else Unavailable
            raise cls(str(err.get("message")), code=err.get("code"))
        if event.get("usage"):
            self.usage = event["usage"]
        delta = ""
        for c in event.get("choices") or []:
            if c.get("index", 0) != 0:
                continue
            delta += c.get("text") or (c.get("delta") or {}).get("content") or ""
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
        return delta or None


def _target(target: str) -> tuple[str, str | None]:
    """(base URL, Unix socket path or None)."""
    if target.startswith(("http://", "https://")):
        return target.rstrip("/"), None
    return "http://localhost", target


class _StreamBase:
    def __init__(self, client: Any, path: str, body: dict[str, Any]):
        self._client, self._path, self._body = client, path, body
        self._state = _StreamState()

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._state.usage


class Stream(_StreamBase):
    """Iterator of text deltas; after it ends, `finish_reason` and `usage` are filled in."""

    _client: httpx.Client

    def __iter__(self) -> Iterator[str]:
        try:
            with self._client.stream("POST", self._path, json=self._body) as resp:
                if resp.status_code >= 400:
                    _raise_for(resp, resp.read())
                for line in resp.iter_lines():
                    delta = self._state.feed(line)
                    if delta:
                        yield delta
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the server: {e}") from e


class AsyncStream(_StreamBase):
    """Async iterator of text deltas; `finish_reason` and `usage` are filled in at the end."""

    _client: httpx.AsyncClient

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async with self._client.stream("POST", self._path, json=self._body) as resp:
                if resp.status_code >= 400:
                    _raise_for(resp, await resp.aread())
                async for line in resp.aiter_lines():
                    delta = self._state.feed(line)
                    if delta:
                        yield delta
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the server: {e}") from e


class Client:
    """Blocking client. `target`: the server's socket path, or an http(s):// base URL."""

    def __init__(self, target: str, *, timeout: float | httpx.Timeout | None = None):
        base_url, uds = _target(target)
        self._http = httpx.Client(base_url=base_url, transport=httpx.HTTPTransport(uds=uds),
                                  timeout=_DEFAULT_TIMEOUT if timeout is None else timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None
                 ) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the server: {e}") from e
        _raise_for(resp, resp.content)
        return resp

    def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        return _completion(self._request("POST", "/v1/completions",
                                         {"prompt": prompt, **params}).json())

    def chat(self, messages: str | list[dict[str, Any]], **params: Any) -> Completion:
        return _completion(self._request("POST", "/v1/chat/completions",
                                         _chat_body(messages, params)).json())

    def stream(self, prompt: str | list[int] | None = None, *,
               messages: str | list[dict[str, Any]] | None = None, **params: Any) -> Stream:
        path, body = _stream_request(prompt, messages, params)
        return Stream(self._http, path, body)

    def health(self) -> bool:
        """Ready to answer: the model loaded and warm, not draining (GET /ready)."""
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._request("POST", "/v1/tokenize", {
            "prompt": text, "add_special_tokens": add_special_tokens}).json()["tokens"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as Client."""

    def __init__(self, target: str, *, timeout: float | httpx.Timeout | None = None,
                 max_connections: int = 100):
        base_url, uds = _target(target)
        transport = httpx.AsyncHTTPTransport(
            uds=uds, limits=httpx.Limits(max_connections=max_connections))
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport,
                                       timeout=_DEFAULT_TIMEOUT if timeout is None else timeout)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None
                       ) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the server: {e}") from e
        _raise_for(resp, resp.content)
        return resp

    async def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        resp = await self._request("POST", "/v1/completions", {"prompt": prompt, **params})
        return _completion(resp.json())

    async def chat(self, messages: str | list[dict[str, Any]], **params: Any) -> Completion:
        resp = await self._request("POST", "/v1/chat/completions", _chat_body(messages, params))
        return _completion(resp.json())

    def stream(self, prompt: str | list[int] | None = None, *,
               messages: str | list[dict[str, Any]] | None = None,
               **params: Any) -> AsyncStream:
        path, body = _stream_request(prompt, messages, params)
        return AsyncStream(self._http, path, body)

    async def health(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        resp = await self._request("POST", "/v1/tokenize", {
            "prompt": text, "add_special_tokens": add_special_tokens})
        return resp.json()["tokens"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
