"""The engine loop on its own thread, with an asyncio face for the server.

The loop thread is the only one that touches the engine's state. The event loop only enqueues
commands (add, abort) and receives each step's outputs in one batch through
`call_soon_threadsafe`, so the server stays responsive while a step runs. `heartbeat` is the
monotonic time of the loop's last turn: a hung step stops it, which is what the systemd
watchdog and /health look at.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from edgert.engine.llm_engine import LLMEngine
from edgert.outputs import RequestOutput
from edgert.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float


@dataclass
class _Abort:
    request_id: str


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait: float = 0.5):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._idle_wait = idle_wait
        self._stopping = False
        self.heartbeat = time.monotonic()
        self.error: BaseException | None = None
        self.on_step: Callable[[list[RequestOutput]], None] | None = None  # e.g. metrics

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="edgert-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early (a client that went away)
        aborts the request, which frees its blocks at once. Validation errors
        (RequestRejected) raise before anything is queued."""
        if not self.alive:
            raise EngineDead("the engine loop is not running")
        prompt_ids = list(prompt_ids)
        self.engine.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = q
        self._commands.put(_Add(request_id, prompt_ids, params, time.monotonic()))
        remaining = params.n
        try:
            while remaining:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if self._streams.pop(request_id, None) is not None and remaining:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- the loop thread -------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                self.heartbeat = time.monotonic()
                block = not engine.has_unfinished()
                try:
                    cmd = self._commands.get(timeout=self._idle_wait) if block else \
                        self._commands.get_nowait()
                except queue.Empty:
                    cmd = "none"
                outputs: list[RequestOutput] = []
                while cmd != "none":
                    if cmd is None:
                        if self._stopping:
                            outputs.extend(engine.abort_all())
                            self._deliver(outputs)
                            return
                    elif isinstance(cmd, _Add):
                        self._add(cmd, outputs)
                    else:
                        outputs.extend(engine.abort(cmd.request_id))
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = "none"
                if engine.has_unfinished():
                    outputs.extend(engine.step())
                if outputs:
                    self._deliver(outputs)
        except BaseException as e:  # the loop must not die silently: fail every stream
            log.exception("engine loop failed")
            self.error = e
            self._fail_all(EngineDead(f"engine loop failed: {e!r}"))

    def _add(self, cmd: _Add, outputs: list[RequestOutput]) -> None:
        if cmd.request_id not in self._streams:  # the client left before it started
            return
        try:
            self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id,
                                    arrival=cmd.arrival)
        except ValueError as e:  # RequestRejected raced with another add (queue full)
            self._loop.call_soon_threadsafe(self._put, cmd.request_id, e)  # type: ignore[union-attr]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if self.on_step is not None:
            self.on_step(outputs)
        self._loop.call_soon_threadsafe(self._dispatch, outputs)  # type: ignore[union-attr]

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._put(out.request_id, out)

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _fail_all(self, exc: BaseException) -> None:
        if self._loop is None:
            return

        def fail() -> None:
            for q in self._streams.values():
                q.put_nowait(exc)

        self._loop.call_soon_threadsafe(fail)
