"""The process around the service: load and warm the model while /health answers, serve until
SIGTERM/SIGINT, drain, exit 0 (or 1 if the engine loop died, so a supervisor restarts it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from edgert.config import EngineConfig, engine_config_from_args
from edgert.serve.app import ServeOptions, Service
from edgert.serve.metrics import ServerMetrics
from edgert.serve.transport import ServeError

log = logging.getLogger("edgert.server")


async def _serve(bundle: str, config: EngineConfig, options: ServeOptions,
                 service: Service) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: not waiting for in-flight requests any longer")
            service.force_stop()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await service.open()
    code = 0
    try:
        load = asyncio.create_task(service.load(bundle, config))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info("stopping while the model loads")
            load.cancel()
        else:
            load.result()  # a load error ends here, after the cleanup below
            # A dead engine loop cannot come back: exit non-zero so that Restart=on-failure
            # (or any supervisor) starts a fresh process, watchdog or not.
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopped), 1.0)
                if service.aengine is not None and not service.aengine.alive \
                        and not stop.is_set():
                    log.error("the engine loop died (%r): exiting 1",
                              service.aengine.error)
                    code = 1
                    break
            else:
                log.info("signal received: shutting down")
    finally:
        await service.drain()
    return code


class _MalformedHttpFilter(logging.Filter):
    """aiohttp answers a request its parser rejects with 400 and logs it at ERROR with a
    traceback: from a broken or hostile client that is noise, and a way to flood the journal.
    Such records are dropped here and counted in edgert_http_malformed_total instead."""

    def __init__(self, metrics: ServerMetrics):
        super().__init__()
        self._metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            self._metrics.malformed.inc()
            return False
        return True


def serve(bundle: str, config: EngineConfig, options: ServeOptions) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean drain."""
    service = Service(options)
    logging.getLogger("aiohttp.server").addFilter(_MalformedHttpFilter(service.metrics))
    try:
        code = asyncio.run(_serve(bundle, config, options, service))
    except ServeError as e:
        print(f"edgert serve: error: {e}", file=sys.stderr)
        return 1
    if service.loader is not None and service.loader.is_alive():
        # Stopped mid-load: the loader thread is inside ORT; do not run interpreter teardown
        # under it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def serve_from_args(args: Any) -> int:
    """`edgert serve` (argument parsing lives in edgert.tools.cli)."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(
        socket_path=args.socket, socket_group=args.socket_group, listen=args.listen,
        listen_any_address=args.listen_any_address,
        allow_uids=frozenset(args.allow_uid or ()), allow_gids=frozenset(args.allow_gid or ()),
        grace=args.grace, max_body_size=args.max_body_size,
        served_model_name=args.served_model_name, warmup=not args.no_warmup,
        access_log=args.access_log)
    return serve(args.bundle, engine_config_from_args(args), options)
