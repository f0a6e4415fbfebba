"""The service's sockets: a Unix socket created safely (never wider than its mode, a stale one
replaced, a live one never stolen, only our own file removed), optional TCP on loopback,
sockets handed over by systemd, and the peer credentials (SO_PEERCRED) of a Unix connection."""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import os
import socket
import stat
import struct
from typing import Any

from edgert.serve.systemd import listen_fds

log = logging.getLogger("edgert.server")


class ServeError(RuntimeError):
    """The server refuses to start (socket held by a live server, bad address, ...)."""


class Listeners:
    """Opens the listening sockets and remembers which socket file this process created, so
    that only that file is ever removed."""

    def __init__(self, socket_path: str | None = None, socket_group: str | None = None,
                 socket_mode: int = 0o660, listen: str | None = None,
                 listen_any_address: bool = False, peer_checks: bool = False):
        self.socket_path = socket_path
        self.socket_group = socket_group
        self.socket_mode = socket_mode
        self.listen = listen
        self.listen_any_address = listen_any_address
        self.peer_checks = peer_checks
        self._created_socket: tuple[str, int, int] | None = None  # path, st_dev, st_ino

    def open(self) -> list[socket.socket]:
        """The sockets systemd passed (socket activation), else the ones configured."""
        socks = listen_fds()
        if socks:
            log.info("socket activation: %d socket(s) from systemd%s", len(socks),
                     "; --socket/--listen are not used" if self.socket_path or self.listen
                     else "")
        try:
            if not socks:
                if self.socket_path:
                    socks.append(self._bind_unix(self.socket_path))
                if self.listen:
                    socks.append(bind_tcp(self.listen, self.listen_any_address))
            if not socks:
                raise ServeError("nothing to listen on: give --socket PATH and/or --listen "
                                 "HOST:PORT (or run under systemd socket activation)")
            if self.peer_checks and any(s.family != socket.AF_UNIX for s in socks):
                raise ServeError("--allow-uid/--allow-gid are checked with SO_PEERCRED, which "
                                 "TCP does not have; drop the allow-list or the TCP listener")
        except BaseException:
            for s in socks:
                s.close()
            self.remove_socket()
            raise
        return socks

    def _bind_unix(self, path: str) -> socket.socket:
        _clear_stale_socket(path)
        gid = _group_id(self.socket_group) if self.socket_group else None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a umask that leaves the owner alone, so the file is never wider than
        # intended even for a moment; then set the final group and mode.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ServeError(f"cannot bind {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        st = os.stat(path)
        self._created_socket = (path, st.st_dev, st.st_ino)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.socket_mode)
        except OSError as e:
            sock.close()
            self.remove_socket()
            raise ServeError(f"cannot set the group/mode of {path}: {e.strerror}") from None
        sock.listen(512)
        log.info("listening on unix:%s", path)
        return sock

    def remove_socket(self) -> None:
        """Remove the socket file only if it is still the one this process created: never one
        systemd passed us, nor one a successor has bound since."""
        if self._created_socket is None:
            return
        path, dev, ino = self._created_socket
        self._created_socket = None
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix connection; None on TCP."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _clear_stale_socket(path: str) -> None:
    """A socket file nobody listens on (a crashed server's) is replaced; one a live server
    holds is not stolen; anything that is not a socket is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.warning("replacing stale socket %s (nobody is listening on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        raise ServeError(f"{path}: cannot tell whether a server holds this socket "
                         f"({e.strerror or e}); refusing to replace it") from None
    finally:
        probe.close()
    raise ServeError(f"{path}: another server is listening on this socket; stop it first or "
                     "choose another --socket")


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServeError(f"--socket-group: no group named {group!r}") from None


def bind_tcp(listen: str, any_address: bool) -> socket.socket:
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ServeError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    port = int(port_text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--listen {listen!r}: {e.strerror}") from None
    loopback = all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)
    if not loopback and not any_address:
        raise ServeError(f"--listen {listen!r} is not a loopback address; TCP has no access "
                         "control here, so pass --listen-any-address to expose it anyway")
    family, _, _, _, addr = infos[0]
    try:
        sock = socket.create_server(addr[:2], family=family, backlog=512)
    except OSError as e:
        raise ServeError(f"--listen {listen!r}: {e.strerror}") from None
    log.info("listening on tcp:%s", listen)
    return sock
