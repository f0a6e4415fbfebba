"""Lifecycle and access: SIGTERM drain, sd_notify (READY/EXTEND_TIMEOUT/WATCHDOG/STOPPING) to a real
datagram socket, LISTEN_FDS socket activation, stale and live socket files, socket mode and
peer-credential allow-list, loopback-only TCP, and the unit files under systemd-analyze.

Each server-process test starts its own `edgert serve` (small shapes, so start-up is a few
seconds); in-process tests run the Service on a temporary socket in the test's event loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server import REPO, ServerProcess, read_sse

SMALL = ("--max-num-seqs", "8", "--max-num-batched-tokens", "64")


def _uds(path: Path | str, timeout: float = 120) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)),
                             base_url="http://localhost", timeout=timeout)


# ---- unit files ------------------------------------------------------------------------------

def test_unit_files_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    src = REPO / "scripts" / "systemd"
    # verify checks that ExecStart's binary exists: point it at this checkout's venv.
    exe = Path(sys.executable).with_name("edgert")
    if not exe.exists():
        pytest.skip(f"{exe} is missing (install the package into the venv)")
    unit = (src / "edgert.service").read_text()
    assert "/opt/edgert/.venv/bin/edgert" in unit
    (tmp_path / "edgert.service").write_text(unit.replace("/opt/edgert/.venv/bin/edgert",
                                                          str(exe)))
    shutil.copy(src / "edgert.socket", tmp_path / "edgert.socket")
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgert.socket"),
                        str(tmp_path / "edgert.service")], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edgert",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "ReadWritePaths=/run/edgert"):
        assert line in unit, line
    sock_unit = (src / "edgert.socket").read_text()
    assert "ListenStream=/run/edgert/edgert.sock" in sock_unit and "SocketMode=0660" in sock_unit


# ---- SIGTERM drain, stale and live sockets ---------------------------------------------------

def test_sigterm_drains_8_streams(smollm2_bundle, tmp_path):
    sock = tmp_path / "s.sock"
    # A crashed server's socket file: nobody listens on it, so it is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    srv = ServerProcess(smollm2_bundle.path, sock, *SMALL)
    try:
        srv.wait_healthy()
        assert "replacing stale socket" in srv.log
        # A live server's socket is not stolen: a second server refuses to start.
        second = subprocess.run([sys.executable, "-m", "edgert", "serve",
                                 str(smollm2_bundle.path), "--socket", str(sock)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "another server is listening" in second.stderr

        async def main() -> list[list[str]]:
            started = asyncio.Event()
            count = 0

            async def stream(i: int) -> list[str]:
                nonlocal count
                body = {"prompt": f"Stream {i}:", "max_tokens": 64, "ignore_eos": True,
                        "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                async with _uds(sock) as c, c.stream("POST", "/v1/completions",
                                                     json=body) as resp:
                    assert resp.status_code == 200
                    events: list[str] = []
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and not events:
                            count += 1
                            if count == 8:
                                started.set()
                        if line.startswith("data: "):
                            events.append(line)
                    return events

            tasks = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.wait_for(started.wait(), 120)
            srv.proc.send_signal(15)
            # The listener closes at once: new connections are refused while streams go on.
            deadline = time.monotonic() + 5
            refused = False
            while time.monotonic() < deadline and not refused:
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(sock))
                except (ConnectionRefusedError, FileNotFoundError):
                    refused = True
                finally:
                    probe.close()
                await asyncio.sleep(0.05)
            assert refused
            assert not all(t.done() for t in tasks)
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        code = srv.proc.wait(60)
    finally:
        srv.stop()
    assert code == 0, srv.log
    assert len(results) == 8
    for events in results:
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 64
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finish[-1] == "length"
    assert not sock.exists()  # created by the server, so removed by it
    assert "draining" in srv.log


# ---- sd_notify ---------------------------------------------------------------------------------

def test_sd_notify_ready_after_warmup_and_watchdog(smollm2_bundle, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1.0)
    sock = tmp_path / "s.sock"
    srv = ServerProcess(smollm2_bundle.path, sock, "--max-num-seqs", "2",
                        "--max-num-batched-tokens", "32", "--max-model-len", "256",
                        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                             "WATCHDOG_USEC": "1000000"}, warmup=True)
    messages: list[tuple[float, str]] = []

    def recv_until(pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = notify.recv(4096).decode()
            except TimeoutError:
                assert srv.proc.poll() is None, srv.log
                continue
            for line in data.split("\n"):
                messages.append((time.monotonic(), line))
            if pred():
                return
        raise AssertionError(f"timed out; got {messages}\n{srv.log}")

    try:
        recv_until(lambda: any(m == "READY=1" for _, m in messages), 180)
        log_at_ready = srv.log
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://localhost") as c:
            assert c.get("/health").status_code == 200  # READY=1 means ready
        names = [m for _, m in messages]
        ready = names.index("READY=1")
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in names[:ready])
        assert "warmed" in log_at_ready  # every shape bucket ran before READY=1
        t_ready = messages[ready][0]
        recv_until(lambda: sum(m == "WATCHDOG=1" and t > t_ready for t, m in messages) >= 3,
                   10)
        srv.proc.send_signal(15)
        recv_until(lambda: any(m == "STOPPING=1" for _, m in messages), 30)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
        notify.close()


def test_watchdog_withheld_when_the_engine_dies(smollm2_bundle, tmp_path):
    """The watchdog pings only while the engine loop is alive and turning: once it is gone,
    the pings stop (systemd would restart the service) and the API answers 503."""
    from edgert.engine import EngineConfig, LLMEngine
    from edgert.serve.app import ServeOptions, Service
    from edgert.serve.systemd import Notifier, run_watchdog

    engine = LLMEngine(smollm2_bundle, EngineConfig(kv_memory=16 << 20, max_model_len=256))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n.sock"))
    notify.setblocking(False)

    def pings() -> int:
        n = 0
        while True:
            try:
                n += notify.recv(4096).decode().split("\n").count("WATCHDOG=1")
            except BlockingIOError:
                return n

    async def main() -> None:
        svc = Service(ServeOptions(socket_path=str(tmp_path / "w.sock")),
                      notifier=Notifier(str(tmp_path / "n.sock")))
        await svc.open()
        svc.attach(engine)
        dog = asyncio.create_task(run_watchdog(svc.notifier, 0.2, lambda: svc.health()[0]))
        try:
            await asyncio.sleep(0.6)
            assert pings() >= 2
            assert svc.aengine is not None
            await svc.aengine.stop()  # the engine loop is gone
            await asyncio.sleep(0.05)
            pings()
            await asyncio.sleep(0.6)
            assert pings() == 0
            async with _uds(tmp_path / "w.sock") as c:
                r = await c.get("/health")
                assert r.status_code == 503 and r.json()["status"] == "engine_dead"
                r = await c.post("/v1/completions", json={"prompt": "x"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        finally:
            dog.cancel()
            await svc.drain()

    asyncio.run(main())
    notify.close()


# ---- socket activation -------------------------------------------------------------------------

_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def test_socket_activation(smollm2_bundle, tmp_path):
    sock = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(16)
    fd = listener.fileno()
    # --socket names the same path: were the passed fd ignored, the server would find a live
    # socket there and refuse to start.
    srv = ServerProcess(smollm2_bundle.path, sock, *SMALL,
                        argv_prefix=[sys.executable, "-c", _ACTIVATE, str(fd)], pass_fds=(fd,))
    try:
        srv.wait_healthy()
        assert "socket activation: 1 socket(s)" in srv.log

        async def main() -> list[dict]:
            async with _uds(sock) as c:
                r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                          "ignore_eos": True})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
                async with c.stream("POST", "/v1/completions", json={
                        "prompt": "Hi", "max_tokens": 3, "stream": True}) as resp:
                    return await read_sse(resp)

        assert asyncio.run(main())[-1] == {"done": True}
        assert srv.stop() == 0, srv.log
    finally:
        srv.stop()
    # systemd owns the socket: the server neither removed the file nor broke the listener.
    assert sock.exists()
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(sock))
    probe.close()
    listener.close()


# ---- access ------------------------------------------------------------------------------------

def test_socket_mode_group_and_peer_allow_list(tmp_path):
    from edgert.serve.app import ServeOptions, Service
    from edgert.serve.systemd import Notifier

    sock = tmp_path / "p.sock"

    async def status(**opts) -> tuple[int, dict, int, int]:
        svc = Service(ServeOptions(socket_path=str(sock), **opts), notifier=Notifier(""))
        await svc.open()
        st = os.stat(sock)
        try:
            async with _uds(sock, timeout=10) as c:
                live = await c.get("/health")
                r = await c.get("/ready")
                if r.status_code != 403:  # liveness: loading is alive
                    assert live.status_code == 200 and live.json()["status"] == "loading"
                return r.status_code, r.json(), st.st_mode & 0o777, st.st_gid
        finally:
            await svc.drain()

    me, gid = os.getuid(), os.getgid()
    code, body, mode, group = asyncio.run(status(socket_group=str(gid)))
    assert mode == 0o660 and group == gid
    assert code == 503 and body["status"] == "loading"  # no model attached: not ready
    code, body, _, _ = asyncio.run(status(allow_uids=frozenset({me + 4242})))
    assert code == 403 and body["error"]["code"] == "forbidden"
    code, _, _, _ = asyncio.run(status(allow_uids=frozenset({me})))
    assert code == 503
    code, _, _, _ = asyncio.run(status(allow_uids=frozenset({me + 1}),
                                       allow_gids=frozenset({gid})))
    assert code == 503
    assert not sock.exists()


def test_refusals_at_start(tmp_path):
    from edgert.serve.app import ServeOptions, Service
    from edgert.serve.systemd import Notifier
    from edgert.serve.transport import ServeError

    async def opened(**opts) -> list[str]:
        svc = Service(ServeOptions(**opts), notifier=Notifier(""))
        try:
            return await svc.open()
        finally:
            await svc.drain()

    with pytest.raises(ServeError, match="not a loopback address"):
        asyncio.run(opened(listen="0.0.0.0:0"))
    names = asyncio.run(opened(listen="0.0.0.0:0", listen_any_address=True))
    assert names and names[0].startswith("http://0.0.0.0:")
    assert asyncio.run(opened(listen="localhost:0"))
    with pytest.raises(ServeError, match="SO_PEERCRED"):
        asyncio.run(opened(socket_path=str(tmp_path / "a.sock"), listen="127.0.0.1:0",
                           allow_uids=frozenset({0})))
    assert not (tmp_path / "a.sock").exists()
    with pytest.raises(ServeError, match="nothing to listen on"):
        asyncio.run(opened())
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ServeError, match="not a socket"):
        asyncio.run(opened(socket_path=str(regular)))
    assert regular.read_text() == "keep me"
    with pytest.raises(ServeError, match="HOST:PORT"):
        asyncio.run(opened(listen="8000"))
