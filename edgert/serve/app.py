"""The HTTP service: the OpenAI-compatible routes, health and metrics on aiohttp, in front of one
AsyncEngine (transport.py opens its sockets, lifecycle.py runs the process).

One AsyncEngine per process; each HTTP request is its own aiohttp handler task that iterates
the engine's output stream. A client that goes away cancels its handler (handler_cancellation),
which closes the stream, which aborts the request and frees its blocks at once.

Lifecycle: bind (refusing a socket a live server holds, replacing a stale one) -> serve /health
as 503 "loading" while the model loads and warms in a thread (systemd start timeout extended
meanwhile) -> READY=1 -> watchdog pings while the engine heartbeat is fresh -> on SIGTERM stop
listening, let in-flight requests finish within the grace period, stop the engine, remove the
socket file if this process created it, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from edgert.config import EngineConfig
from edgert.core.scheduler import RequestRejected
from edgert.engine.async_engine import AsyncEngine, EngineDead
from edgert.engine.llm_engine import LLMEngine
from edgert.outputs import RequestOutput
from edgert.sample.grammar import GrammarError
from edgert.serve.metrics import CONTENT_TYPE, ServerMetrics
from edgert.serve.openai_protocol import (
    ApiError,
    GenerationRequest,
    ParseContext,
    parse_chat,
    parse_completion,
    parse_tokenize,
)
from edgert.serve.responses import ResponseBuilder, TokenText, models_response
from edgert.serve.systemd import Notifier, extend_timeout_while, run_watchdog, watchdog_interval
from edgert.serve.transport import Listeners, peer_credentials

log = logging.getLogger("edgert.server")

MiB = 1 << 20
_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}
_T = TypeVar("_T")


@dataclass
class ServeOptions:
    socket_path: str | None = None
    socket_group: str | None = None  # group name or gid given the socket file (mode 0660)
    socket_mode: int = 0o660
    listen: str | None = None  # "HOST:PORT" for TCP, loopback unless listen_any_address
    listen_any_address: bool = False
    allow_uids: frozenset[int] = frozenset()  # SO_PEERCRED allow-list; empty: no check
    allow_gids: frozenset[int] = frozenset()
    grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_body_size: int = 4 * MiB
    served_model_name: str | None = None
    warmup: bool = True
    heartbeat_timeout: float = 5.0  # an engine loop silent for longer is reported unhealthy
    access_log: bool = False


class Service:
    """The HTTP app plus everything it serves from: sockets, engine, metrics, systemd."""

    def __init__(self, options: ServeOptions, notifier: Notifier | None = None):
        self.options = options
        self.notifier = notifier or Notifier()
        self.aengine: AsyncEngine | None = None
        self.metrics = ServerMetrics(lambda: self.aengine, lambda: self.model_name)
        self.model_name: str | None = None
        self.draining = False
        self.started = int(time.time())
        self.loader: threading.Thread | None = None
        self._ctx: ParseContext | None = None
        self._token_text: TokenText | None = None
        self._runner: web.AppRunner | None = None
        self._listeners = Listeners(options.socket_path, options.socket_group,
                                    options.socket_mode, options.listen,
                                    options.listen_any_address,
                                    bool(options.allow_uids or options.allow_gids))
        self._watchdog: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()  # requests being answered
        self._force = asyncio.Event()
        self.app = self._build_app()

    # ---- the app -------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_body_size,
                              middlewares=[self._middleware])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/tokenize", self._tokenize)
        app.router.add_post("/v1/detokenize", self._detokenize)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        # lm-evaluation-harness's `tokenizer_backend=remote` (vLLM's unversioned routes)
        app.router.add_get("/tokenizer_info", self._tokenizer_info)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        """Peer check, uniform JSON errors (aiohttp's own 404/405/413 included) and the HTTP
        request counter. Labels are bounded: hostile paths and methods cannot grow them."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"
        status = 499  # the client went away before an answer
        task = asyncio.current_task()  # aiohttp runs each request in a task of its own
        if task is not None:
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        try:
            self._check_peer(request)
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.status
            return _error_response(e, close=e.status == 403)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            status = e.status
            return _error_response(self._http_error(request, e))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # a bug: answer 500 and keep serving
            log.exception("unhandled error in %s %s", request.method, route)
            status = 500
            return _error_response(ApiError(500, "internal server error", None, "internal"))
        finally:
            self.metrics.http_requests.labels(route, method, str(status)).inc()

    def _check_peer(self, request: web.Request) -> None:
        opts = self.options
        if not opts.allow_uids and not opts.allow_gids:
            return
        creds = peer_credentials(request.transport)
        if creds is None:
            raise ApiError(403, "peer credentials are unavailable on this connection",
                           None, "forbidden")
        _pid, uid, gid = creds
        if uid not in opts.allow_uids and gid not in opts.allow_gids:
            raise ApiError(403, f"peer uid {uid} / gid {gid} is not allowed on this socket",
                           None, "forbidden")

    def _http_error(self, request: web.Request, e: web.HTTPException) -> ApiError:
        """aiohttp's own refusals, in the API's JSON error shape."""
        path = request.path[:100]
        if e.status == 413:
            return ApiError(413, f"request body too large (limit {self.options.max_body_size} "
                                 "bytes)", "body", "body_too_large")
        if e.status == 404:
            return ApiError(404, f"no route {path}", None, "not_found")
        if e.status == 405:
            allow = e.headers.get("Allow", "")
            return ApiError(405, f"method {request.method[:16]} is not allowed on {path}", None,
                            "method_not_allowed", {"Allow": allow} if allow else None)
        return ApiError(e.status, e.reason or "error", None, None)

    def _engine(self) -> AsyncEngine:
        if self.draining:
            raise ApiError(503, "the server is shutting down", None, "shutting_down",
                           {"Retry-After": "5"})
        if self.aengine is None:
            raise ApiError(503, "the model is loading", None, "loading", {"Retry-After": "5"})
        if not self.aengine.alive:
            raise ApiError(503, "the engine is not running", None, "engine_dead")
        return self.aengine

    # ---- generation ----------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def _generate(self, request: web.Request,
                        parse: Callable[[dict[str, Any], ParseContext], GenerationRequest]
                        ) -> web.StreamResponse:
        aengine = self._engine()
        body = await _json_body(request)
        assert self._ctx is not None and self._token_text is not None
        req = parse(body, self._ctx)
        for ids in req.prompts:  # all of a batch is checked before any of it starts
            try:
                aengine.engine.validate(ids, req.params)
            except RequestRejected as e:
                raise _rejected(e) from None
        builder = ResponseBuilder(req, self._token_text)
        async with contextlib.aclosing(self._outputs(aengine, req)) as outputs:
            try:
                # Wait for the first output before answering, so that a request the engine
                # refuses late (queue full) still gets a proper status code.
                first = await anext(outputs)
            except StopAsyncIteration:  # only if the engine stopped under the request
                raise ApiError(503, "the engine stopped", None, "engine_dead") from None
            except (RequestRejected, EngineDead) as e:
                raise _engine_error(e) from None
            if not req.stream:
                try:
                    builder.add(*first)
                    async for item in outputs:
                        builder.add(*item)
                except (RequestRejected, EngineDead) as e:
                    raise _engine_error(e) from None
                return web.json_response(builder.response())
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            try:
                await _send(resp, builder, first)
                async for item in outputs:
                    await _send(resp, builder, item)
                if req.include_usage:
                    await resp.write(_sse(builder.chunk([], builder.usage())))
            except (RequestRejected, EngineDead) as e:
                await resp.write(_sse(_engine_error(e).body()))
            except ConnectionResetError:  # the client left; closing `outputs` aborts
                return resp
            await resp.write(b"data: [DONE]\n\n")
            return resp

    async def _outputs(self, aengine: AsyncEngine,
                       req: GenerationRequest) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(prompt index, output) for every prompt of the request, merged as they come."""
        # aclosing: a stream left early aborts its engine request now, not when collected.
        if len(req.prompts) == 1:
            async with contextlib.aclosing(_generator(
                    aengine.generate(req.prompts[0], req.params, req.request_id))) as gen:
                async for out in gen:
                    yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async with contextlib.aclosing(_generator(
                        aengine.generate(ids, req.params, f"{req.request_id}-{i}"))) as gen:
                    async for out in gen:
                        queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(req.prompts)]
        remaining = len(req.prompts) * req.params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item[1].finished
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the rest of the API -------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        aengine = self._engine()
        assert self.model_name is not None
        body = models_response(self.model_name, self.started, aengine.engine.max_model_len)
        body["data"][0]["provider"] = self.provider
        return web.json_response(body)

    async def _tokenizer_info(self, request: web.Request) -> web.Response:
        """The special tokens (as text, as lm-eval asks for them) and the chat template."""
        aengine = self._engine()
        tok = aengine.tokenizer

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tok.hf.id_to_token(token_id)

        eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
        return web.json_response({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(tok.bos_token_id),
            "eos_token": text(eos), "pad_token": text(eos), "add_bos_token": tok.add_bos_token,
            "chat_template": tok.chat_template, "model_max_length": aengine.engine.max_model_len,
            "vocab_size": aengine.engine.model_config.vocab_size})

    async def _tokenize(self, request: web.Request) -> web.Response:
        aengine = self._engine()
        body = await _json_body(request)
        assert self._ctx is not None
        ids = parse_tokenize(body, self._ctx)
        return web.json_response({"tokens": ids, "count": len(ids),
                                  "max_model_len": aengine.engine.max_model_len})

    async def _detokenize(self, request: web.Request) -> web.Response:
        aengine = self._engine()
        body = await _json_body(request)
        tokens = body.get("tokens")
        vocab = aengine.engine.model_config.vocab_size
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                for t in tokens):
            raise ApiError(400, f"tokens: must be an array of token ids in [0, {vocab})",
                           "tokens", "invalid_value")
        return web.json_response({"prompt": aengine.tokenizer.decode(tokens)})

    def health(self) -> tuple[bool, str]:
        """Healthy only with the model loaded and the engine loop alive and turning."""
        if self.draining:
            return False, "draining"
        if self.aengine is None:
            return False, "loading"
        if not self.aengine.alive:
            return False, "engine_dead"
        if time.monotonic() - self.aengine.heartbeat > self.options.heartbeat_timeout:
            return False, "engine_stalled"
        return True, "ok"

    async def _health(self, request: web.Request) -> web.Response:
        """Liveness: 503 only when the engine loop died or stalled (a supervisor should restart
        the service); loading and draining are alive."""
        ok, status = self.health()
        alive = ok or status in ("loading", "draining")
        return web.json_response({"status": status, "model": self.model_name,
                                  "provider": self.provider}, status=200 if alive else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness: 200 only once the model is loaded and every shape warmed, and not while
        draining, so a gateway sends work only where it will be answered at once."""
        ok, status = self.health()
        return web.json_response({"status": status, "model": self.model_name,
                                  "provider": self.provider}, status=200 if ok else 503)

    @property
    def provider(self) -> str | None:
        """The execution provider the graph actually runs on (ORT reports it after session
        creation; a GPU provider that fell back to the CPU is refused at load)."""
        if self.aengine is None:
            return None
        return getattr(self.aengine.engine.runner.backend, "provider", None)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # ---- lifecycle -----------------------------------------------------------------------
    async def open(self) -> list[str]:
        """Bind (or take from systemd) the listening sockets and start answering; returns the
        sites' names. Generation answers 503 until `attach`/`load`."""
        sockets = self._listeners.open()
        self._runner = web.AppRunner(self.app, handle_signals=False, handler_cancellation=True,
                                     shutdown_timeout=2.0,
                                     access_log=log if self.options.access_log else None)
        await self._runner.setup()
        names = []
        for sock in sockets:
            site = web.SockSite(self._runner, sock)
            await site.start()
            names.append(site.name)
        return names

    def attach(self, engine: LLMEngine) -> None:
        """Serve a loaded (and warmed) engine."""
        aengine = AsyncEngine(engine)

        def on_step(outputs: list[RequestOutput]) -> None:
            try:  # runs on the engine thread: a metrics bug must not kill the engine loop
                self.metrics.on_step(outputs)
            except Exception:
                log.exception("metrics update failed")

        aengine.on_step = on_step
        aengine.start()
        self.model_name = self.options.served_model_name or engine.bundle.name
        block_size, total_blocks = engine.block_size, engine.pool_usage().total
        self._ctx = ParseContext(self.model_name, engine.tokenizer, engine.max_model_len,
                                 lambda n: (total_blocks // n) * block_size,
                                 check_grammar=engine.grammars.check)
        self._token_text = TokenText(engine.tokenizer)
        self.aengine = aengine

    async def load(self, bundle: str, config: EngineConfig) -> None:
        """Load and warm the model off the event loop (so /health answers meanwhile), then
        attach it and tell systemd READY=1."""
        period = watchdog_interval()
        self.notifier.notify("STATUS=loading the model")
        every = min(5.0, period / 2) if period else 5.0
        with extend_timeout_while(self.notifier, asyncio.get_running_loop(), every,
                                  watchdog=period is not None):
            engine = await self._in_thread(lambda: _load_engine(bundle, config,
                                                                self.options.warmup))
        self.attach(engine)
        self.notifier.notify("READY=1", f"STATUS=serving {self.model_name}")
        log.info("ready: serving %s", self.model_name)
        if period is not None:
            self._watchdog = asyncio.create_task(
                run_watchdog(self.notifier, period, lambda: self.health()[0]))

    async def _in_thread(self, fn: Callable[[], _T]) -> _T:
        """Run fn on a daemon thread: unlike the default executor, a SIGTERM during the load
        does not have to wait for it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        def run() -> None:
            try:
                result: Any = fn()
                ok = True
            except BaseException as e:
                result, ok = e, False
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
                loop.call_soon_threadsafe(settle, ok, result)

        self.loader = threading.Thread(target=run, name="edgert-load", daemon=True)
        self.loader.start()
        return await fut

    async def drain(self) -> None:
        """Stop listening, give in-flight requests the grace period, stop the engine."""
        if self.draining:
            return
        self.draining = True
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # closes the listening socket: new connections are refused
            await self._finish_inflight()
            await self._runner.cleanup()  # closes the idle keep-alive connections
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.aengine is not None:
            await self.aengine.stop()
        self._listeners.remove_socket()
        self.notifier.close()

    async def _finish_inflight(self) -> None:
        """Requests in flight get the grace period (cut short by `force_stop`); what is left
        then is cancelled, which aborts its engine requests. aiohttp's own shutdown timeout
        applies twice (to wait, then again after cancelling), so the grace is enforced here."""
        loop = asyncio.get_running_loop()
        pending = {t for t in self._inflight if t is not asyncio.current_task()}
        if pending:
            log.info("draining: %d request(s) in flight, up to %.0f s", len(pending),
                     self.options.grace)
        deadline = loop.time() + self.options.grace
        while pending and not self._force.is_set() and loop.time() < deadline:
            force = asyncio.ensure_future(self._force.wait())
            done, _ = await asyncio.wait([*pending, force], timeout=deadline - loop.time(),
                                         return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            pending -= done
        if pending:
            log.warning("cancelling %d request(s) still in flight", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=5.0)

    def force_stop(self) -> None:
        """Stop waiting for in-flight requests (a second SIGTERM/SIGINT)."""
        self._force.set()


def _load_engine(bundle: str, config: EngineConfig, warmup: bool) -> LLMEngine:
    t0 = time.monotonic()
    engine = LLMEngine(bundle, config)
    log.info("model %s loaded in %.1f s (pool %d blocks)", engine.bundle.name,
             time.monotonic() - t0, engine.pool_usage().total)
    if warmup:
        t1 = time.monotonic()
        shapes = engine.warmup()
        log.info("warmed %d shapes in %.1f s", shapes, time.monotonic() - t1)
        t1 = time.monotonic()
        try:  # built now, not on the first constrained request
            engine.grammars.ll_tokenizer  # noqa: B018
            log.info("constraint tokenizer built in %.1f s", time.monotonic() - t1)
        except GrammarError as e:
            log.warning("%s: requests with a constraint will be refused", e)
    return engine


# ---- small helpers ---------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON body: {str(e)[:200]}", None, "invalid_json"
                       ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return body


def _error_response(e: ApiError, close: bool = False) -> web.Response:
    resp = web.json_response(e.body(), status=e.status, headers=e.headers)
    if close:
        resp.force_close()
    return resp


def _rejected(e: RequestRejected) -> ApiError:
    if e.status == 429:
        return ApiError(429, str(e), None, "queue_full", {"Retry-After": "1"})
    return ApiError(e.status, str(e), e.field, "invalid_value")


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, RequestRejected):
        return _rejected(e)
    return ApiError(503, str(e), None, "engine_dead")


def _generator(it: AsyncIterator[_T]) -> AsyncGenerator[_T, None]:
    """AsyncEngine.generate is an async generator typed as an iterator; aclosing needs the
    former."""
    assert isinstance(it, AsyncGenerator)
    return it


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


async def _send(resp: web.StreamResponse, builder: ResponseBuilder,
                item: tuple[int, RequestOutput]) -> None:
    entry = builder.add(*item)
    if entry is None:
        return
    usage = builder.usage() if builder.done and not builder.req.include_usage else None
    await resp.write(_sse(builder.chunk([entry], usage)))


