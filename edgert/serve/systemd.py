"""The systemd side of the service, without libsystemd: the sd_notify datagram protocol, the
watchdog, and LISTEN_FDS socket activation. Each is a few lines of the documented protocol, so
a board needs no extra package and the behaviour is testable with a plain datagram socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state lines to $NOTIFY_SOCKET. A no-op when the variable is unset, so the server
    runs the same under systemd, in a terminal and in tests. Send failures are logged, never
    raised: a broken notify socket must not take the service down with it."""

    def __init__(self, path: str | None = None):
        path = os.environ.get("NOTIFY_SOCKET") if path is None else path
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if path:
            # A leading '@' names an abstract-namespace socket (sd_notify(3)).
            self._addr = b"\0" + path[1:].encode() if path.startswith("@") else path
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *states: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto("\n".join(states).encode(), self._addr)
        except OSError as e:
            log.warning("sd_notify(%s) failed: %s", ", ".join(states), e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """The watchdog period systemd asked for (WatchdogSec=), in seconds; None when it is off or
    meant for another process (WATCHDOG_PID names the one main process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


async def run_watchdog(notifier: Notifier, period: float, healthy: Callable[[], bool]) -> None:
    """Ping WATCHDOG=1 every period/2 while `healthy()` holds. The check is the engine's
    heartbeat, not this coroutine's own liveness: a hung engine loop then stops the pings
    and systemd restarts the service, while a live event loop alone proves nothing."""
    while True:
        if healthy():
            notifier.notify("WATCHDOG=1")
        else:
            log.error("engine heartbeat is stale: withholding the systemd watchdog ping")
        await asyncio.sleep(period / 2)


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)): fds 3.. when LISTEN_PID
    is this process. The variables are removed so that no child inherits them."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"socket activation: fd {fd} is not a stream socket")
        socks.append(sock)
    return socks


@contextlib.contextmanager
def extend_timeout_while(notifier: Notifier, loop: asyncio.AbstractEventLoop,
                         every: float = 5.0, watchdog: bool = False) -> Iterator[None]:
    """Keep extending systemd's start timeout (EXTEND_TIMEOUT_USEC) while the body runs, so a
    slow model load on a small board is not killed by TimeoutStartSec, yet a load that hangs
    the whole process still is (the pings come from the event loop). With `watchdog`, the
    same timer also pings WATCHDOG=1: there is no engine loop to vouch for yet."""
    usec = int(every * 3 * 1e6)
    states = [f"EXTEND_TIMEOUT_USEC={usec}"] + (["WATCHDOG=1"] if watchdog else [])

    handle: asyncio.TimerHandle | None = None

    def ping() -> None:
        nonlocal handle
        notifier.notify(*states)
        handle = loop.call_later(every, ping)

    if notifier.enabled:
        ping()
    try:
        yield
    finally:
        if handle is not None:
            handle.cancel()
