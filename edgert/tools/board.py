"""`edgert board`: the board side of `edgert deploy`, run over ssh with the board's own edgert.

The layout under the root (default /opt/edgert):

    venvs/<wheel sha256[:16]>/   a venv (--system-site-packages, so JetPack's tensorrt is
                                 visible) with one wheel installed; reused while the wheel is
    bin/edgert                   the newest installed edgert (for --list / --rollback)
    releases/<id>/bundle/        the bundle, copied by rsync
    releases/<id>/units/         edgert.service + edgert.socket rendered for this release
    releases/<id>/edgert.env     EnvironmentFile of the unit (release id, root, wheel)
    releases/<id>/venv           symlink to the venv this release runs with
    releases/<id>/release.json   status: verified / active / failed (and why)
    current                      symlink to releases/<id>, switched atomically (rename)
    history.jsonl                one line per switch, for --list and --rollback
    run/                         the direct mode's pid file

Activation verifies every file of the bundle against the manifest's sha256 BEFORE `current` is
switched, then (re)starts the service and waits for READY=1, then sends one completion through
the Unix socket. If the new release does not get there, `current` goes back to the previous
release, which is restarted and checked the same way, and the command exits non-zero saying why.

Two ways to run the service: `systemd` (units copied to /etc/systemd/system, `systemctl
restart`, which returns once the Type=notify service sent READY=1) when /run/systemd/system
exists, else `direct`: this command runs the installed unit's ExecStart itself, detached, with
a NOTIFY_SOCKET of its own, and waits for READY=1 (a board or container without systemd as
PID 1). Only `direct` has been run here.

`ensure-venv` runs before any edgert is installed on the board: with the wheel itself on
PYTHONPATH (`PYTHONPATH=edgert.whl python -m edgert.tools.board ensure-venv ...`). This module
therefore imports only the standard library at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.bundle import sha256_file  # standard library only, like this module

DEFAULT_ROOT = "/opt/edgert"
DEFAULT_SOCKET = "/run/edgert/edgert.sock"
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")
UNITS = ("edgert.service", "edgert.socket")
HEALTH_PROMPT = "Hello"

# exit codes of `activate` / `rollback`
EXIT_REFUSED = 1      # nothing switched (verification failed, bad arguments)
EXIT_ROLLED_BACK = 3  # the new release failed; the previous one serves again
EXIT_DOWN = 4         # the new release failed and so did the rollback (or there was none)


class BoardError(ValueError):
    """A refusal with a message for the operator (printed without a traceback)."""


def say(msg: str) -> None:
    print(f"board: {msg}", flush=True)


# ---- the layout ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.run / "edgert.pid"

    def release(self, rid: str) -> Path:
        if not rid or "/" in rid or rid.startswith("."):
            raise BoardError(f"bad release id {rid!r}")
        return self.releases / rid

    def current_id(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def switch(self, rid: str | None) -> None:
        """Point `current` at releases/<rid> atomically: a symlink under a temporary name, then
        rename(2) over the old one, so a reader sees the old release or the new, never none."""
        if rid is None:
            with contextlib.suppress(FileNotFoundError):
                self.current.unlink()
            return
        tmp = self.root / f".current.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"releases/{rid}", tmp)
        os.replace(tmp, self.current)

    def record(self, event: str, rid: str, **extra: Any) -> None:
        with open(self.history, "a") as f:
            f.write(json.dumps({"time": time.time(), "event": event, "release": rid, **extra})
                    + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history.exists():
            return []
        out = []
        for line in self.history.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def meta(self, rid: str) -> dict[str, Any]:
        try:
            return json.loads((self.release(rid) / "release.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_meta(self, rid: str, **fields: Any) -> None:
        meta = {**self.meta(rid), **fields}
        path = self.release(rid) / "release.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path)

    def previous_good(self, exclude: str) -> str | None:
        """The last release that served (activated or rolled back to), other than `exclude`,
        that is still on the board and not marked failed."""
        for entry in reversed(self.read_history()):
            rid = entry.get("release")
            if (entry.get("event") in ("activated", "rolled-back") and rid and rid != exclude
                    and (self.releases / rid / "units" / "edgert.service").exists()
                    and self.meta(rid).get("status") != "failed"):
                return rid
        return None


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ---- the venv ------------------------------------------------------------------------------------

def ensure_venv(layout: Layout, wheel: Path, python: str, pip_args: list[str],
                env: dict[str, str] | None = None,
                source: str = "the board's package index") -> tuple[Path, bool]:
    """A venv with `wheel` installed, keyed by the wheel's sha256; returns (venv, reused).
    `pip_args` and `env` go to its `pip install` (`edgert install` passes --no-index
    --find-links with the packed wheels); `source` says where the dependencies come from."""
    if not wheel.is_file():
        raise BoardError(f"{wheel}: no such wheel on the board")
    sha = sha256_file(wheel)
    venv = layout.root / "venvs" / sha[:16]
    marker = venv / ".edgert-wheel-sha256"
    reused = marker.exists() and marker.read_text().strip() == sha and (
        venv / "bin" / "edgert").exists()
    if not reused:
        if venv.exists():
            say(f"removing the incomplete venv {venv}")
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        say(f"creating {venv} (--system-site-packages) with {python}")
        r = subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)])
        if r.returncode != 0:
            raise BoardError(f"{python} -m venv failed (exit {r.returncode}); on Debian/JetPack "
                             "install python3-venv")
        say(f"installing {wheel.name} and its dependencies from {source}")
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", *pip_args, str(wheel)], env=env)
        if r.returncode != 0:
            raise BoardError(f"pip install {wheel.name} failed (exit {r.returncode}); the venv "
                             f"{venv} is left incomplete and will be rebuilt on the next deploy")
        marker.write_text(sha + "\n")  # last: a venv without it is rebuilt
    else:
        say(f"reusing {venv}: the same wheel (sha256 {sha[:16]}) is installed there")
    (layout.root / "bin").mkdir(parents=True, exist_ok=True)
    _atomic_symlink(str(venv / "bin" / "edgert"), layout.root / "bin" / "edgert")
    return venv, reused


# ---- units -----------------------------------------------------------------------------------

def _template(name: str) -> str:
    from importlib.resources import files

    return (files("edgert.serve") / "units" / f"{name}.in").read_text()


def render_units(*, release: str, root: Path, venv: Path, user: str = "edgert",
                 group: str = "edgert", socket_path: str = DEFAULT_SOCKET,
                 kv_memory: str = "25%", device: str | None = None,
                 serve_args: list[str] | None = None, timeout_start: str = "120s",
                 bundle: Path | None = None, env_file: Path | None = None) -> dict[str, str]:
    """edgert.service and edgert.socket for one release, from the templates shipped in the
    package (the units of scripts/systemd with this release's paths)."""
    rel = root / "releases" / release
    bundle = rel / "bundle" if bundle is None else bundle
    env_file = rel / "edgert.env" if env_file is None else env_file
    argv = [str(venv / "bin" / "edgert"), "serve", str(bundle), "--socket", socket_path,
            "--socket-group", group, "--kv-memory", kv_memory,
            *(["--device", device] if device else []), *(serve_args or [])]
    for a in argv:
        if not a or any(c.isspace() or c in "\"'\\$;" for c in a):
            raise BoardError(f"unsupported character in a unit argument: {a!r}")
    # systemd expands % specifiers in ExecStart: a literal % is %%.
    exec_start = " ".join(argv).replace("%", "%%")
    sock_dir = str(Path(socket_path).parent)
    if Path(sock_dir).parent == Path("/run"):
        runtime = ("# The socket directory; kept across restarts so that edgert.socket's file "
                   "survives them.\n"
                   f"RuntimeDirectory={Path(sock_dir).name}\nRuntimeDirectoryMode=0750\n"
                   "RuntimeDirectoryPreserve=yes\n")
    else:
        runtime = f"# The socket directory {sock_dir} is created by `edgert board activate`.\n"
    values = {"RELEASE": release, "EXEC_START": exec_start, "USER": user, "GROUP": group,
              "ENV_FILE": str(env_file), "RUNTIME_DIRECTORY": runtime.rstrip("\n"),
              "SOCKET_DIR": sock_dir, "SOCKET": socket_path, "TIMEOUT_START": timeout_start}
    out = {}
    for name in UNITS:
        text = _template(name)
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        leftover = re.findall(r"@[A-Z_]+@", text)
        if leftover:
            raise BoardError(f"{name}: unrendered template fields {leftover}")
        out[name] = text
    return out


@dataclass
class Unit:
    """The parts of a rendered edgert.service that the direct mode honours."""
    exec_start: list[str]
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    environment: dict[str, str] = field(default_factory=dict)
    timeout_start: float = 90.0
    timeout_stop: float = 90.0
    runtime_directories: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> str | None:
        argv = self.exec_start
        for i, a in enumerate(argv[:-1]):
            if a == "--socket":
                return argv[i + 1]
        return None


def _seconds(value: str) -> float:
    value = value.strip()
    units = {"ms": 1e-3, "min": 60.0, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix, mult in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "").isdigit():
            return float(value[: -len(suffix)]) * mult
    return float(value)


def parse_unit(path: Path) -> Unit:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    unit = Unit(exec_start=[])
    section = ""
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if key == "ExecStart":
            unit.exec_start = [a.replace("%%", "%") for a in shlex.split(value.lstrip("-@+!:"))]
        elif key == "User":
            unit.user = value
        elif key == "Group":
            unit.group = value
        elif key == "UMask":
            unit.umask = int(value, 8)
        elif key == "Environment":
            for item in shlex.split(value):
                k, _, v = item.partition("=")
                unit.environment[k] = v
        elif key == "EnvironmentFile":
            optional = value.startswith("-")
            env_path = Path(value.lstrip("-"))
            if not env_path.exists():
                if optional:
                    continue
                raise BoardError(f"{path}: EnvironmentFile {env_path} is missing")
            for item in env_path.read_text().splitlines():
                if item.strip() and not item.lstrip().startswith("#") and "=" in item:
                    k, _, v = item.partition("=")
                    unit.environment[k.strip()] = v.strip().strip('"')
        elif key == "TimeoutStartSec":
            unit.timeout_start = _seconds(value)
        elif key == "TimeoutStopSec":
            unit.timeout_stop = _seconds(value)
        elif key == "RuntimeDirectory":
            unit.runtime_directories += value.split()
    if not unit.exec_start:
        raise BoardError(f"{path}: no ExecStart")
    return unit


# ---- the service: direct mode -----------------------------------------------------------------

def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in ticks), or None when the process is gone or
    a zombie (exited, not yet reaped by its new parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class DirectService:
    """Runs the current release's ExecStart as a detached process (its own session, output to
    the release's service.log) and waits for READY=1 on a NOTIFY_SOCKET it binds itself."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def running(self) -> tuple[int, str] | None:
        try:
            pid_s, start, rid = self.layout.pid_file.read_text().split()[:3]
        except (FileNotFoundError, ValueError):
            return None
        if _proc_start_time(int(pid_s)) != start:
            return None
        return int(pid_s), rid

    def stop(self, timeout: float = 45.0) -> None:
        found = self.running()
        if found is not None:
            pid, rid = found
            say(f"stopping release {rid} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _proc_start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if _proc_start_time(pid) is not None:
                say(f"pid {pid} did not stop in {timeout:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _proc_start_time(pid) is not None:
                    time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.layout.pid_file.unlink()

    def start(self, rid: str, timeout: float | None) -> str | None:
        """Start release `rid` (the one `current` points at); None once READY=1, else why not."""
        unit_path = self.layout.current / "units" / "edgert.service"
        unit = parse_unit(unit_path)
        self.stop(unit.timeout_stop)
        for d in unit.runtime_directories:
            Path("/run", d).mkdir(mode=0o750, parents=True, exist_ok=True)
        if unit.socket_path:
            Path(unit.socket_path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if unit.user and unit.user != pwd.getpwuid(os.getuid()).pw_name:
            if os.getuid() != 0:
                raise BoardError(f"the unit runs as {unit.user}; the direct mode can switch "
                                 "users only as root")
            kwargs["user"] = unit.user
            kwargs["group"] = unit.group or unit.user
        if unit.umask is not None:
            kwargs["umask"] = unit.umask
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"edgert-notify-{os.getpid()}-{time.monotonic_ns()}"
        notify.bind(b"\0" + name.encode())
        notify.settimeout(0.2)
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
        env.update(unit.environment)
        env["NOTIFY_SOCKET"] = "@" + name
        log_path = self.layout.release(rid) / "service.log"
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        say(f"starting release {rid}: {shlex.join(unit.exec_start)}")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(unit.exec_start, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    cwd="/", **kwargs)
        self.layout.run.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{proc.pid} {_proc_start_time(proc.pid)} {rid}\n")
        os.replace(tmp, self.layout.pid_file)
        limit = unit.timeout_start if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            while True:
                try:
                    data = notify.recv(4096).decode(errors="replace")
                except TimeoutError:
                    data = ""
                for line in data.split("\n"):
                    if line == "READY=1":
                        say(f"release {rid} sent READY=1 (pid {proc.pid})")
                        return None
                    if line.startswith("EXTEND_TIMEOUT_USEC=") and timeout is None:
                        with contextlib.suppress(ValueError):
                            deadline = max(deadline, time.monotonic()
                                           + int(line.split("=", 1)[1]) / 1e6)
                    if line.startswith("STATUS="):
                        say(f"status: {line[7:]}")
                code = proc.poll()
                if code is not None:
                    return (f"the service exited with status {code} before READY=1; its log "
                            f"ends:\n{_tail(log_path, log_offset)}")
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    return (f"no READY=1 within {limit:.0f} s (killed); its log ends:\n"
                            f"{_tail(log_path, log_offset)}")
        finally:
            notify.close()


def _tail(path: Path, offset: int = 0, lines: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "  (no log)"
    return "\n".join("  | " + s for s in text.splitlines()[-lines:])


# ---- the service: systemd mode (NOT RUN here: systemd is not PID 1 on this project's machines)

class SystemdService:
    def __init__(self, layout: Layout, unit_dir: Path):
        self.layout = layout
        self.unit_dir = unit_dir

    def _systemctl(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                              timeout=timeout)

    def stop(self, timeout: float = 45.0) -> None:
        self._systemctl("stop", "edgert.service", "edgert.socket", timeout=timeout + 15)

    def start(self, rid: str, timeout: float | None) -> str | None:
        src = self.layout.current / "units"
        unit = parse_unit(src / "edgert.service")
        if unit.socket_path:
            Path(unit.socket_path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        for name in UNITS:
            tmp = self.unit_dir / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, self.unit_dir / name)
        r = self._systemctl("daemon-reload")
        if r.returncode != 0:
            return f"systemctl daemon-reload failed: {r.stderr.strip()}"
        self._systemctl("enable", "edgert.socket", "edgert.service")
        self._systemctl("start", "edgert.socket")
        limit = unit.timeout_start if timeout is None else timeout
        say(f"systemctl restart edgert.service (release {rid}; waits for READY=1)")
        try:
            # Type=notify: the start job completes when the service sends READY=1.
            r = self._systemctl("restart", "edgert.service", timeout=limit + 30)
        except subprocess.TimeoutExpired:
            return f"systemctl restart did not return within {limit + 30:.0f} s"
        if r.returncode != 0:
            journal = subprocess.run(["journalctl", "-u", "edgert.service", "-n", "12",
                                      "--no-pager"], capture_output=True, text=True)
            return f"systemctl restart failed: {r.stderr.strip()}\n{journal.stdout}"
        return None


def service_for(layout: Layout, mode: str, unit_dir: str = "/etc/systemd/system"):
    if mode == "auto":
        mode = "systemd" if Path("/run/systemd/system").is_dir() else "direct"
    if mode == "systemd":
        return SystemdService(layout, Path(unit_dir))
    return DirectService(layout)


# ---- verify, check, activate, roll back -------------------------------------------------------

def verify_release(layout: Layout, rid: str) -> dict[str, Any]:
    """Every file's size and sha256 against the manifest (edgert.bundle), before any switch."""
    from edgert.bundle import Bundle, BundleError

    path = layout.release(rid) / "bundle"
    t = time.monotonic()
    try:
        bundle = Bundle.load(path, verify=True)
    except BundleError as e:
        raise BoardError(f"release {rid}: verification failed: {e}") from None
    total = sum(f["bytes"] for f in bundle.manifest["files"].values())
    say(f"verified {len(bundle.manifest['files'])} files ({total / 2**20:.1f} MiB) against the "
        f"manifest's sha256 in {time.monotonic() - t:.1f} s")
    return bundle.manifest


def health_check(socket_path: str, timeout: float = 60.0) -> str | None:
    """One real completion through the Unix socket; None when it was answered, else why not."""
    from edgert.client import Client, EdgertError

    try:
        with Client(socket_path, timeout=timeout) as c:
            r = c.complete(HEALTH_PROMPT, max_tokens=2, temperature=0)
    except EdgertError as e:
        return f"no answer through {socket_path}: {e}"
    if r.completion_tokens < 1:
        return f"the completion through {socket_path} returned no tokens"
    say(f"answered through {socket_path}: {HEALTH_PROMPT!r} -> {r.text!r}")
    return None


def bring_up(layout: Layout, service, rid: str, timeout: float | None) -> str | None:
    """Switch to `rid`, start it, wait for READY=1, ask it one question; None or why it failed."""
    layout.switch(rid)
    why = service.start(rid, timeout)
    if why is not None:
        return why
    unit = parse_unit(layout.release(rid) / "units" / "edgert.service")
    if unit.socket_path is None:
        return "the unit's ExecStart has no --socket: cannot check it"
    return health_check(unit.socket_path)


def _fall_back(layout: Layout, service, failed: str, why: str, timeout: float | None) -> int:
    layout.write_meta(failed, status="failed", reason=why.splitlines()[0])
    layout.record("failed", failed, reason=why.splitlines()[0])
    prev = layout.previous_good(exclude=failed)
    print(f"board: release {failed} failed: {why}", file=sys.stderr, flush=True)
    if prev is None:
        service.stop()
        layout.switch(None)
        print(f"board: error: release {failed} failed and there is no previous release to roll "
              "back to; the service is stopped", file=sys.stderr, flush=True)
        return EXIT_DOWN
    say(f"rolling back to release {prev}")
    why_prev = bring_up(layout, service, prev, timeout)
    if why_prev is not None:
        print(f"board: error: release {failed} failed ({why.splitlines()[0]}), and the rollback "
              f"to {prev} failed too: {why_prev}", file=sys.stderr, flush=True)
        return EXIT_DOWN
    layout.record("rolled-back", prev, after=failed)
    layout.write_meta(prev, status="active")
    print(f"board: error: release {failed} failed ({why.splitlines()[0]}); rolled back to "
          f"{prev}, which answers", file=sys.stderr, flush=True)
    return EXIT_ROLLED_BACK


def _engine_flags(serve_args: list[str]) -> list[str]:
    """The engine options among `serve_args` (with their values): a TensorRT plan fixes the pool
    and the shapes, so `build-engine` must get exactly the ones the service will run with."""
    from edgert.config import add_engine_args

    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    takes = {o: a.nargs != 0 for a in p._actions for o in a.option_strings}
    out, it = [], iter(serve_args)
    for tok in it:
        opt = tok.split("=", 1)[0]
        if opt in takes and opt not in ("--device", "--kv-memory", "--provider"):
            out.append(tok)
            if takes[opt] and "=" not in tok:
                out.append(next(it, ""))
    return out


def build_engine_if_possible(rel: Path, venv: Path, args: argparse.Namespace) -> list[str]:
    """On a board with a GPU and TensorRT, the release's portable bundle becomes a TensorRT
    engine for this board and the service runs it (returns the serve flags that say so);
    elsewhere the service runs on ONNX Runtime's CPU provider, and the deploy says so rather
    than leaving it to be discovered."""
    if not args.device:
        return []
    py = str(venv / "bin" / "python")
    probe = subprocess.run(
        [py, "-c", "from edgert.runner.backends import unavailable; "
                   "print(unavailable('tensorrt-native') or '')"],
        capture_output=True, text=True, timeout=120)
    why = probe.stdout.strip() or probe.stderr.strip()[-300:]
    flavour = json.loads((rel / "bundle" / "manifest.json").read_text())["graph"].get("flavour")
    if why or flavour == "cpu":
        reason = why or "the bundle is a cpu flavour (export --flavour portable for TensorRT)"
        say(f"no TensorRT engine: {reason}; the service runs on ONNX Runtime's CPU provider")
        return []
    cmd = [str(venv / "bin" / "edgert"), "build-engine", str(rel / "bundle"), "--device",
           args.device, "--kv-memory", args.kv_memory,
           *_engine_flags(shlex.split(args.serve_args or ""))]
    say(f"building the TensorRT engine for {args.device}: {shlex.join(cmd)}")
    if subprocess.run(cmd).returncode != 0:
        raise BoardError("edgert build-engine failed (its output is above); nothing switched")
    return ["--provider", "tensorrt-native"]


def write_release_files(layout: Layout, args: argparse.Namespace) -> None:
    rel = layout.release(args.release)
    venv = Path(args.venv).resolve()
    if not (venv / "bin" / "edgert").exists():
        raise BoardError(f"{venv}: no edgert installed in this venv")
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        raise BoardError(f"user {args.user!r} does not exist on the board; create it (useradd "
                         "--system --no-create-home --shell /usr/sbin/nologin edgert) or pass "
                         "--user") from None
    _atomic_symlink(str(venv), rel / "venv")
    units = render_units(release=args.release, root=layout.root, venv=rel / "venv",
                         user=args.user, group=args.group or args.user,
                         socket_path=args.socket, kv_memory=args.kv_memory,
                         device=args.device,
                         serve_args=[*shlex.split(args.serve_args or ""),
                                     *build_engine_if_possible(rel, venv, args)])
    (rel / "units").mkdir(exist_ok=True)
    for name, text in units.items():
        (rel / "units" / name).write_text(text)
    marker = venv / ".edgert-wheel-sha256"
    wheel = marker.read_text().strip() if marker.exists() else ""
    (rel / "edgert.env").write_text(
        f"# written by edgert board activate\nEDGERT_RELEASE={args.release}\n"
        f"EDGERT_ROOT={layout.root}\nEDGERT_WHEEL_SHA256={wheel}\n")


def activate(args: argparse.Namespace) -> int:
    layout = Layout(Path(args.root).resolve())
    rid = args.release
    if not (layout.release(rid) / "bundle").is_dir():
        raise BoardError(f"release {rid}: no bundle at {layout.release(rid) / 'bundle'}")
    manifest = verify_release(layout, rid)  # raises before anything is switched
    write_release_files(layout, args)
    layout.write_meta(rid, id=rid, name=manifest.get("name"), status="verified",
                      created=layout.meta(rid).get("created", time.time()),
                      bundle_bytes=sum(f["bytes"] for f in manifest["files"].values()),
                      device=args.device, venv=str(Path(args.venv).resolve()))
    service = service_for(layout, args.mode, args.unit_dir)
    before = layout.current_id()
    say(f"switching current: {before or '(none)'} -> {rid}")
    why = bring_up(layout, service, rid, args.timeout)
    if why is not None:
        return _fall_back(layout, service, rid, why, args.timeout)
    layout.record("activated", rid, previous=before)
    layout.write_meta(rid, status="active", activated=time.time(), reason=None)
    say(f"release {rid} is serving")
    return 0


def rollback(args: argparse.Namespace) -> int:
    layout = Layout(Path(args.root).resolve())
    cur = layout.current_id()
    target = args.to or layout.previous_good(exclude=cur or "")
    if target is None:
        raise BoardError("no previous release to roll back to")
    verify_release(layout, target)
    service = service_for(layout, args.mode, args.unit_dir)
    say(f"rolling back: {cur or '(none)'} -> {target}")
    why = bring_up(layout, service, target, args.timeout)
    if why is not None:
        if cur is None or cur == target:
            print(f"board: error: release {target} failed: {why}", file=sys.stderr)
            return EXIT_DOWN
        print(f"board: release {target} failed: {why}; going back to {cur}", file=sys.stderr)
        why_cur = bring_up(layout, service, cur, args.timeout)
        return EXIT_ROLLED_BACK if why_cur is None else EXIT_DOWN
    layout.record("rolled-back", target, after=cur)
    layout.write_meta(target, status="active")
    say(f"release {target} is serving")
    return 0


def list_releases(layout: Layout) -> list[dict[str, Any]]:
    if not layout.releases.is_dir():
        return []
    cur = layout.current_id()
    prev = layout.previous_good(exclude=cur or "")
    rows = []
    for rel in layout.releases.iterdir():
        if not rel.is_dir():
            continue
        meta = layout.meta(rel.name)
        status = {"active": "served"}.get(meta.get("status"), meta.get("status") or "incomplete")
        if rel.name == cur:
            status = "current"
        elif rel.name == prev:
            status = "previous"
        rows.append({"id": rel.name, "status": status, "name": meta.get("name"),
                     "created": meta.get("created", rel.stat().st_mtime),
                     "bytes": meta.get("bundle_bytes"), "reason": meta.get("reason"),
                     "current": rel.name == cur})
    rows.sort(key=lambda r: r["created"])
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = list_releases(Layout(Path(args.root).resolve()))
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no releases under {args.root}")
        return 0
    print(f"{'':2}{'release':40} {'status':10} {'created (UTC)':19} {'size':>9}")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"]))
        size = f"{r['bytes'] / 2**20:.1f} MiB" if r["bytes"] else ""
        line = (f"{'*' if r['current'] else ' '} {r['id']:40} {r['status']:10} {created:19} "
                f"{size:>9}")
        if r["reason"] and r["status"] == "failed":
            line += f"  ({r['reason']})"
        print(line)
    return 0


def prepare_release(layout: Layout, rid: str) -> Path:
    """releases/<id>/ with an (empty, or partly copied) bundle/ and its release.json; returns
    the release directory. Used by `board prepare` (before rsync) and `edgert install`."""
    rel = layout.release(rid)
    (rel / "bundle").mkdir(parents=True, exist_ok=True)
    if not layout.meta(rid):
        layout.write_meta(rid, id=rid, status="incomplete", created=time.time())
    return rel


def _prepare(args: argparse.Namespace) -> int:
    """Create releases/<id>/bundle for rsync and say what is there (one JSON line)."""
    layout = Layout(Path(args.root).resolve())
    prepare_release(layout, args.release)
    print(json.dumps({"root": str(layout.root), "current": layout.current_id()}))
    return 0


def _ensure_venv(args: argparse.Namespace) -> int:
    venv, reused = ensure_venv(Layout(Path(args.root).resolve()), Path(args.wheel),
                               args.python or sys.executable, shlex.split(args.pip_args or ""))
    print(json.dumps({"venv": str(venv), "reused": reused}), flush=True)
    return 0


def _stop(args: argparse.Namespace) -> int:
    service_for(Layout(Path(args.root).resolve()), args.mode, args.unit_dir).stop()
    return 0


def outcome(code: int, rid: str, where: str = "") -> str:
    """What a failed `activate` (exit `code`) means, for the host-side commands' last line."""
    on = f" on {where}" if where else ""
    if code == EXIT_ROLLED_BACK:
        return (f"release {rid} failed{on} and was rolled back to the previous release, which "
                "answers (the reason is above)")
    if code == EXIT_DOWN:
        return f"release {rid} failed{on} and nothing is serving (see above)"
    return f"release {rid} was refused{on} before the switch (see above); nothing switched"


def _run(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BoardError as e:
            print(f"board: error: {e}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
    return run


def register(sub) -> None:
    p = sub.add_parser(
        "board", help="the board side of `edgert deploy` (releases, activation, rollback)",
        description="Run on the board by `edgert deploy` over ssh: keeps releases side by side "
                    "under --root, verifies a bundle's sha256 before switching the `current` "
                    "symlink, restarts the service (systemctl, or the unit's ExecStart itself "
                    "where systemd is not running), waits for READY=1, checks one completion "
                    "through the socket and rolls back to the previous release if any of it "
                    "fails.")
    add_actions(p)


def add_service_args(g: Any) -> None:
    """How the service runs: the same options for `deploy`, `install` and `board activate`."""
    g.add_argument("--user", default="edgert", help="service user (edgert)")
    g.add_argument("--group", default=None, help="socket group (default: the user's name)")
    g.add_argument("--socket", default=DEFAULT_SOCKET, help=f"Unix socket ({DEFAULT_SOCKET})")
    g.add_argument("--kv-memory", default="25%",
                   help="edgert serve --kv-memory (25%%: with --device, of what the fit plan "
                        "leaves)")
    g.add_argument("--serve-args", default=None,
                   help="more `edgert serve` flags, one quoted string (a single flag "
                        "needs the =: --serve-args=--no-prefix-caching)")


def add_start_args(g: Any, unit_dir: bool = True) -> None:
    """How the board starts the service and how long it waits for READY=1."""
    g.add_argument("--mode", choices=["auto", "systemd", "direct"], default="auto",
                   help="systemd when /run/systemd/system exists (auto), else run the unit's "
                        "ExecStart directly")
    if unit_dir:
        g.add_argument("--unit-dir", default="/etc/systemd/system",
                       help="where the systemd mode installs the units")
    g.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for READY=1 (default: the unit's TimeoutStartSec, "
                        "extended by EXTEND_TIMEOUT_USEC while the model loads)")


def add_actions(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="board_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser, service: bool = True) -> None:
        q.add_argument("--root", default=DEFAULT_ROOT, help=f"the deploy root ({DEFAULT_ROOT})")
        if service:
            add_start_args(q)

    q = bsub.add_parser("ensure-venv", help="a venv with this wheel (reused when installed)")
    common(q, service=False)
    q.add_argument("--wheel", required=True, help="the wheel, already on the board")
    q.add_argument("--python", help="interpreter for the venv (default: this one)")
    q.add_argument("--pip-args", help="extra pip install arguments, one string "
                   "(a single flag needs the =: --pip-args=--no-compile)")
    q.set_defaults(func=_run(_ensure_venv))

    q = bsub.add_parser("prepare", help="create a release directory for the copy")
    common(q, service=False)
    q.add_argument("--release", required=True,
                   help="the new release's id (a directory name under ROOT/releases)")
    q.set_defaults(func=_run(_prepare))

    q = bsub.add_parser("activate", help="verify, switch, start, check; roll back on failure")
    common(q)
    q.add_argument("--release", required=True, help="the prepared release to switch to")
    q.add_argument("--venv", required=True, help="the venv the release runs with")
    q.add_argument("--device", default=None, help="device profile for edgert serve --device")
    add_service_args(q)
    q.set_defaults(func=_run(activate))

    q = bsub.add_parser("rollback", help="switch back to the previous release and check it")
    common(q)
    q.add_argument("--to", default=None, help="release id (default: the previous one)")
    q.set_defaults(func=_run(rollback))

    q = bsub.add_parser("list", help="the releases on the board")
    common(q, service=False)
    q.add_argument("--json", action="store_true", help="print the releases as JSON")
    q.set_defaults(func=_run(_list))

    q = bsub.add_parser("stop", help="stop the service")
    common(q)
    q.set_defaults(func=_run(_stop))


def main(argv: list[str] | None = None) -> int:
    """`python -m edgert.tools.board ACTION ...`: the same actions before edgert is installed
    (the wheel itself on PYTHONPATH)."""
    parser = argparse.ArgumentParser(prog="edgert board")
    add_actions(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
