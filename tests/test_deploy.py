"""`edgert deploy` end to end against a real sshd on 127.0.0.1: a throwaway host key and client key
in a tmp dir, a tmp directory standing in for the board's root, tiny random bundles.

The tests run in order on one board: a first release installs edgert into a venv there and
answers through the socket; a second release is copied over a slowed link, interrupted and
resumed (fewer bytes the second time), reuses the venv and answers; a broken third one is rolled
back automatically; `--list` shows them; a byte flipped in a file already on the board (same size
and mtime, so rsync's quick check skips it) is caught before the switch; `--rollback` switches
back. systemd is not PID 1 here, so the board runs the units' ExecStart itself (direct mode)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgert.bundle import Bundle
from edgert.client import Client
from edgert.tools.board import Layout, parse_unit, render_units
from edgert.tools.deploy import release_id
from tests.sshd import Sshd, skip_reason
from tests.tiny_bundles import broken_copy, make_bundle, rewrite_file

REPO = Path(__file__).resolve().parent.parent
PADDING = 4 << 20  # the second bundle carries a large file, so its copy can be interrupted


class Board(Sshd):
    """sshd on 127.0.0.1 (tests/sshd.py) plus the arguments that point `edgert deploy` at it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "board"
        self.socket = self.root / "run" / "edgert.sock"
        super().__init__(tmp)

    def deploy_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edgert", "deploy", *args,
                "--to", f"{self.user}@127.0.0.1", "--ssh-config", str(self.ssh_config),
                "--port", str(self.port), "--identity", str(self.identity),
                "--root", str(self.root)]

    def service_args(self) -> list[str]:
        return ["--python", sys.executable, "--user", self.user, "--group", self.group,
                "--socket", str(self.socket), "--kv-memory", "8MiB",
                "--serve-args", "--max-num-seqs 2 --max-num-batched-tokens 32",
                "--timeout", "120"]

    def deploy(self, *args: str, service: bool = True) -> subprocess.CompletedProcess:
        extra = self.service_args() if service else []
        r = subprocess.run(self.deploy_argv(*args, *extra), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        print(f"$ edgert deploy {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def answers(self) -> tuple[str, str]:
        """(served model name, completion text) through the board's socket, by edgert.client."""
        with Client(str(self.socket), timeout=60) as c:
            r = c.complete("w5 w6 w7", max_tokens=3, temperature=0, ignore_eos=True)
            assert r.completion_tokens == 3
            return c.models()[0], r.text

    def current(self) -> str | None:
        return Layout(self.root).current_id()

    def stop(self) -> None:
        if self.root.exists():
            subprocess.run([sys.executable, "-m", "edgert", "board", "stop", "--root",
                            str(self.root), "--mode", "direct"], cwd=REPO, timeout=120)
        self.stop_sshd()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    first = make_bundle(root, "tiny-one", seed=1)
    second = make_bundle(root, "tiny-two", seed=2)
    rewrite_file(second, "padding.bin", os.urandom(PADDING))  # incompressible, listed
    broken = broken_copy(first, root / "tiny-broken")
    for b in (first, second, broken):
        Bundle.load(b)
    return {"one": first, "two": second, "broken": broken}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    b = Board(tmp_path_factory.mktemp("deploy"))
    try:
        yield b
    finally:
        b.stop()
    assert Layout(b.root).pid_file.exists() is False  # the service was stopped


def _rid(bundle: Path) -> str:
    return release_id(Bundle.load(bundle, verify=False))


def _sent(stdout: str) -> int:
    return int(re.search(r"copy: done, sent (\d+) bytes", stdout).group(1))


# ---- the releases, in order ----------------------------------------------------------------

def test_first_release_installs_edgert_and_answers(board, bundles):
    # one pip flag on its own reaches the board's pip (not taken for an option of ensure-venv)
    r = board.deploy(str(bundles["one"]), "--pip-args=--no-compile")
    assert r.returncode == 0, r.stderr
    rid = _rid(bundles["one"])
    assert board.current() == rid
    assert "--system-site-packages" in r.stdout and "installing edgert" in r.stdout
    assert "verified 3 files" in r.stdout and "sent READY=1" in r.stdout
    assert f"deployed {rid}" in r.stdout
    rel = board.root / "releases" / rid
    assert (rel / "units" / "edgert.service").exists() and (rel / "edgert.env").exists()
    assert f"EDGERT_RELEASE={rid}" in (rel / "edgert.env").read_text()
    venv = (rel / "venv").resolve()
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1
    # a runtime-only install from the wheel, not this checkout
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import edgert, sys; print(edgert.__file__)"],
                          capture_output=True, text=True, check=True, cwd="/").stdout
    assert str(venv) in site
    name, text = board.answers()
    assert name == "tiny-one" and text.strip()


def _hear_ctrl_c() -> None:
    """A suite started as a background job of a non-interactive shell inherits SIGINT ignored,
    and so would the deploy: Ctrl-C would then reach only rsync and ssh (which set their own
    handlers), and the deploy would report a failed copy instead of an interrupted one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_copy_resumes_and_the_second_release_answers(board, bundles):
    rid = _rid(bundles["two"])
    dest = board.root / "releases" / rid / "bundle"
    proc = subprocess.Popen(
        board.deploy_argv(str(bundles["two"]), "--bwlimit", "800", *board.service_args()),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_hear_ctrl_c)
    deadline = time.monotonic() + 300  # generous: the steps before the copy slow under load
    partial = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in dest.glob(".padding.bin.*")] if dest.is_dir() else []
            partial = max([p.stat().st_size for p in tmp] + [0])
            if partial > 1 << 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None and partial > 1 << 20, "the slowed copy was never caught"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the deploy's terminal
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "interrupted during the copy" in err, err
    kept = dest / ".rsync-partial" / "padding.bin"
    deadline = time.monotonic() + 60
    while not kept.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the board's rsync keeps the partial file when the link drops
    assert kept.exists() and kept.stat().st_size >= partial
    kept_bytes = kept.stat().st_size
    assert board.current() == _rid(bundles["one"])  # nothing switched
    assert board.answers()[0] == "tiny-one"

    r = board.deploy(str(bundles["two"]))
    assert r.returncode == 0, r.stderr
    sent = _sent(r.stdout)
    # only the rest of the large file crossed the link (+ rsync's block checksums)
    assert sent < PADDING - kept_bytes // 2, (sent, kept_bytes)
    assert not kept.exists()
    assert "reusing" in r.stdout and "installing edgert" not in r.stdout  # same wheel, same venv
    assert board.current() == rid
    assert board.answers()[0] == "tiny-two"


def test_broken_release_is_rolled_back(board, bundles):
    r = board.deploy(str(bundles["broken"]))
    assert r.returncode == 3, r.stdout + r.stderr
    rid, prev = _rid(bundles["broken"]), _rid(bundles["two"])
    assert f"release {rid} failed" in r.stderr
    assert "exited with status" in r.stderr and "before READY=1" in r.stderr
    assert f"rolled back to {prev}, which answers" in r.stderr
    assert "was rolled back to the previous release" in r.stderr
    assert board.current() == prev
    assert board.answers()[0] == "tiny-two"


def test_list_shows_the_releases(board, bundles):
    r = board.deploy("--list", service=False)
    assert r.returncode == 0, r.stderr
    one, two, broken = (_rid(bundles[k]) for k in ("one", "two", "broken"))
    by_id = {next(w for w in line.split() if w.startswith("tiny")): line
             for line in r.stdout.splitlines()[1:]}
    assert by_id[two].startswith("*") and " current " in by_id[two]
    assert " previous " in by_id[one]
    assert " failed " in by_id[broken] and "before READY=1" in by_id[broken]
    assert set(by_id) == {one, two, broken}


def test_flipped_byte_on_the_board_is_caught_before_the_switch(board, bundles):
    rid = _rid(bundles["one"])
    target = board.root / "releases" / rid / "bundle" / "model.onnx.data"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # rsync's quick check: unchanged
    r = board.deploy(str(bundles["one"]))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "verification failed" in r.stderr and "model.onnx.data" in r.stderr
    assert "sha256 does not match" in r.stderr and "--checksum" in r.stderr
    assert board.current() == _rid(bundles["two"])  # nothing switched, still serving
    assert board.answers()[0] == "tiny-two"

    r = board.deploy(str(bundles["one"]), "--checksum")  # re-sends by content
    assert r.returncode == 0, r.stderr
    assert board.current() == rid and board.answers()[0] == "tiny-one"


def test_rollback_command(board, bundles):
    r = board.deploy("--rollback", "--mode", "direct", "--timeout", "120", service=False)
    assert r.returncode == 0, r.stderr
    assert board.current() == _rid(bundles["two"])
    assert board.answers()[0] == "tiny-two"


# ---- user mistakes, units ----------------------------------------------------------------------

def test_clear_errors_without_tracebacks(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "edgert", "deploy", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    r = run(str(tmp_path), "--to", "nohost")
    assert r.returncode == 1 and "expected USER@HOST" in r.stderr
    r = run(str(tmp_path / "missing"), "--to", "a@127.0.0.1")
    assert r.returncode == 1 and "not a bundle directory" in r.stderr
    r = run("--to", "a@127.0.0.1", "--ssh-config", str(tmp_path / "nope"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = run("--to", "a@127.0.0.1")
    assert r.returncode == 1 and "give a BUNDLE" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "--rollback" in r.stdout and "exit status" in r.stdout


def _directives(text: str) -> list[str]:
    text = re.sub(r"\\\n\s*", "", text)
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_generated_units_match_scripts_systemd_and_verify(tmp_path):
    # Rendered with the documented paths, the templates are the units of scripts/systemd (plus
    # the release's EnvironmentFile and its name in the description).
    units = render_units(release="r1", root=Path("/opt/edgert"), venv=Path("/opt/edgert/.venv"),
                         bundle=Path("/var/lib/edgert/bundle"))
    src = REPO / "scripts" / "systemd"
    for name in ("edgert.service", "edgert.socket"):
        # `25%%` is systemd's escape for a literal %; the static unit's bare `25%` works only
        # because it ends the line (the rendered one may be followed by --device or more flags).
        got = [d.replace("%%", "%") for d in _directives(units[name])
               if not d.startswith(("EnvironmentFile=", "Description="))]
        want = [d for d in _directives((src / name).read_text())
                if not d.startswith("Description=")]
        assert got == want, name

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    venv = Path(sys.executable).parent.parent  # verify checks that ExecStart's binary exists
    if not (venv / "bin" / "edgert").exists():
        pytest.skip(f"{venv}/bin/edgert is missing (install the package into the venv)")
    units = render_units(release="r2", root=tmp_path, venv=venv, user="root", group="root",
                         socket_path=str(tmp_path / "run" / "edgert.sock"), kv_memory="25%",
                         device="orin-nano-8gb", serve_args=["--max-num-seqs", "4"])
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "releases" / "r2").mkdir(parents=True)
    (tmp_path / "releases" / "r2" / "edgert.env").write_text("EDGERT_RELEASE=r2\n")
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgert.socket"),
                        str(tmp_path / "edgert.service")], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    unit = parse_unit(tmp_path / "edgert.service")
    assert unit.exec_start[:3] == [str(venv / "bin" / "edgert"), "serve",
                                   str(tmp_path / "releases" / "r2" / "bundle")]
    assert unit.exec_start[unit.exec_start.index("--device") + 1] == "orin-nano-8gb"
    assert unit.exec_start[unit.exec_start.index("--kv-memory") + 1] == "25%"
    assert unit.socket_path == str(tmp_path / "run" / "edgert.sock")
    assert unit.environment["EDGERT_RELEASE"] == "r2" and unit.user == "root"
    assert "ListenStream=" + str(tmp_path / "run" / "edgert.sock") in units["edgert.socket"]


@pytest.mark.parametrize("serve_args", ["--no-prefix-caching", "--max-num-seqs 2 --grace 5"])
def test_install_passes_serve_args_the_board_parses_back(serve_args, tmp_path):
    """`edgert install`'s activate command line through `edgert board`'s own parser: a single
    flag arrives as the value of --serve-args, not as an option of `activate`."""
    import argparse

    from edgert.tools.board import add_actions
    from edgert.tools.install import _activate_argv

    args = argparse.Namespace(user="edgert", socket="/run/edgert/edgert.sock", kv_memory="25%",
                              mode="direct", unit_dir=str(tmp_path), timeout=30, group=None,
                              device="orin-nano-8gb", serve_args=serve_args)
    argv = _activate_argv(args, tmp_path / "venv", "r1", tmp_path)
    assert argv[1:3] == ["board", "activate"]
    parser = argparse.ArgumentParser(prog="edgert board")
    add_actions(parser)
    parsed = parser.parse_args(argv[2:])
    assert (parsed.serve_args, parsed.release, parsed.device) == (serve_args, "r1",
                                                                   "orin-nano-8gb")


def test_engine_build_step_on_a_board_without_tensorrt(bundles, tmp_path, capsys):
    """On a board with a GPU and TensorRT the release's bundle is built into an engine with the
    service's own engine flags; here (no TensorRT) the deploy says the service runs on the CPU
    provider and adds no flag. Run with this venv standing in for the release's."""
    import argparse

    from edgert.tools.board import _engine_flags, build_engine_if_possible

    assert _engine_flags(["--max-num-seqs", "8", "--socket-group=x", "--block-size=16",
                          "--no-prefix-caching", "--kv-memory", "1GiB", "--grace", "5"]) == [
        "--max-num-seqs", "8", "--block-size=16", "--no-prefix-caching"]
    rel = tmp_path / "rel"
    shutil.copytree(bundles["one"], rel / "bundle")
    args = argparse.Namespace(device="orin-nano-8gb", kv_memory="25%", serve_args="")
    assert build_engine_if_possible(rel, Path(sys.prefix), args) == []
    out = capsys.readouterr().out
    assert "no TensorRT engine" in out and "CPU provider" in out
    args.device = None
    assert build_engine_if_possible(rel, Path(sys.prefix), args) == []
