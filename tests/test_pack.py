"""`edgert pack` / `edgert install` end to end, offline: tiny random bundles packed for this
machine, installed into a tmp directory standing in for an air-gapped board's root.

The tests run in order on one board: the first archive is installed by a Python that has no
edgert (the packed wheel on PYTHONPATH, as on a fresh board) with every package index and proxy
pointed at a local HTTP server that records what reaches it (nothing may), and answers through
its socket; an archive of a broken bundle is
installed with the board's own `edgert install` and rolled back; an archive with one flipped
byte is refused before anything is written. systemd is not PID 1 here, so the service runs in
the direct mode. A last test packs for aarch64 / Python 3.10 (a Jetson), which needs the package
index."""

from __future__ import annotations

import getpass
import grp
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from edgert.bundle import Bundle
from edgert.client import Client
from edgert.tools.board import DirectService, Layout
from edgert.tools.deploy import release_id
from tests.tiny_bundles import broken_copy, make_bundle

REPO = Path(__file__).resolve().parent.parent
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
RUNTIME = ("edgert", "numpy", "onnxruntime", "tokenizers", "jinja2", "aiohttp", "httpx",
           "prometheus_client")


def _board_python() -> str:
    """The board's interpreter: the system Python (outside any venv, without edgert, like a
    Jetson's) when it is this Python's version and can make venvs, else this one."""
    for cand in ("/usr/bin/python3",):
        if not os.path.exists(cand):
            continue
        r = subprocess.run([cand, "-c", "import sys, ensurepip, venv; "
                            "print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == PY:
            return cand
    return sys.executable


class NetworkTrap:
    """An HTTP server on 127.0.0.1 that answers 503 to everything and records each request: the
    board's package index and its proxies. Without --no-index, pip asks it for every
    dependency (/simple/numpy/ ...) even when --find-links has them all, and quietly goes on."""

    def __init__(self):
        self.hits: list[str] = []
        trap = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                trap.hits.append(self.requestline)
                self.send_error(503)

            do_CONNECT = do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        """A board without network: no pip configuration of this machine's, every index and
        proxy pointing at the trap, no retries. Only the archive can satisfy pip."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PIP_") and k.lower() not in ("http_proxy", "https_proxy",
                                                                 "all_proxy", "no_proxy")}
        env.update(PIP_INDEX_URL=f"{self.url}/simple", PIP_EXTRA_INDEX_URL=f"{self.url}/extra",
                   PIP_RETRIES="0", PIP_TIMEOUT="5", http_proxy=self.url, https_proxy=self.url,
                   HTTP_PROXY=self.url, HTTPS_PROXY=self.url, PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        return env

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _pack(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "edgert", "pack", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    print(f"$ edgert pack {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n"
          f"{r.stderr[-3000:]}")
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _pack_json(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "PACK.json"
        return json.loads(tar.extractfile("PACK.json").read())


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under the board's root with its size and mtime (the running service's own
    log aside)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if p.name != "service.log"}


class Board:
    def __init__(self, tmp: Path):
        self.trap = NetworkTrap()
        self.tmp = tmp
        self.root = tmp / "board"
        self.socket = self.root / "run" / "edgert.sock"
        self.python = _board_python()
        self.user = getpass.getuser()
        self.group = grp.getgrgid(os.getgid()).gr_name

    def service_args(self) -> list[str]:
        return ["--root", str(self.root), "--mode", "direct", "--user", self.user,
                "--group", self.group, "--socket", str(self.socket), "--kv-memory", "8MiB",
                "--serve-args", "--max-num-seqs 2 --max-num-batched-tokens 32",
                "--timeout", "120", "--python", self.python]

    def bootstrap_install(self, archive: Path, *extra: str) -> subprocess.CompletedProcess:
        """What an operator does on a board with no edgert: the packed wheel on PYTHONPATH."""
        boot = self.tmp / "boot"
        boot.mkdir(exist_ok=True)
        with tarfile.open(archive) as tar:
            name = _pack_json(archive)["wheel"]
            (boot / Path(name).name).write_bytes(tar.extractfile(name).read())
        env = {**self.trap.env(), "PYTHONPATH": str(boot / Path(name).name)}
        return self._run([self.python, "-m", "edgert.tools.install", str(archive),
                          *self.service_args(), *extra], env)

    def install(self, archive: Path, *extra: str) -> subprocess.CompletedProcess:
        """Later archives: the board's own edgert (ROOT/bin/edgert install)."""
        return self._run([str(self.root / "bin" / "edgert"), "install", str(archive),
                          *self.service_args(), *extra], self.trap.env())

    def _run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, cwd=self.tmp, env=env, capture_output=True, text=True,
                           timeout=600)
        print(f"$ {' '.join(argv[:4])} ... -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def answers(self) -> str:
        with Client(str(self.socket), timeout=60) as c:
            r = c.complete("w5 w6 w7", max_tokens=3, temperature=0, ignore_eos=True)
            assert r.completion_tokens == 3 and r.text.strip()
            return c.models()[0]

    def current(self) -> str | None:
        return Layout(self.root).current_id()

    def stop(self) -> None:
        if self.root.exists():
            DirectService(Layout(self.root)).stop()
        self.trap.stop()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pack")
    one = make_bundle(root, "tiny-one", seed=1)
    broken = broken_copy(one, root / "tiny-broken")
    out: dict[str, Any] = {}
    for key, bundle in (("one", one), ("broken", broken)):
        Bundle.load(bundle)
        out[key] = root / f"{key}.tar"
        r = _pack(str(bundle), "-o", str(out[key]))
        assert r.returncode == 0, r.stderr
        out[f"{key}-stdout"] = r.stdout
        out[f"{key}-bundle"] = bundle
    return out


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    b = Board(tmp_path_factory.mktemp("board"))
    try:
        yield b
    finally:
        b.stop()
    assert not Layout(b.root).pid_file.exists()  # the service was stopped


# ---- in order on one board ----------------------------------------------------------------

def test_pack_holds_wheels_bundle_and_checksums(archives):
    archive = archives["one"]
    pack = _pack_json(archive)
    bundle = Bundle.load(archives["one-bundle"], verify=False)
    assert pack["format"] == "edgert-pack" and pack["edgert_version"] == "0.1.0"
    assert pack["target"]["machine"] == os.uname().machine and pack["target"]["python"] == PY
    assert pack["bundle"]["release_id"] == release_id(bundle) and pack["device"] is None
    with tarfile.open(archive, "r:") as tar:  # a plain, uncompressed tar
        infos = {i.name: i for i in tar.getmembers() if i.name != "PACK.json"}
        assert set(infos) == set(pack["members"])
        for name, want in pack["members"].items():
            data = tar.extractfile(infos[name]).read()
            assert len(data) == want["bytes"] and hashlib.sha256(data).hexdigest() == \
                want["sha256"], name
    names = [n.split("/", 1)[1] for n in pack["members"] if n.startswith("wheels/")]
    for dist in ("edgert", "numpy", "onnxruntime", "tokenizers", "aiohttp"):
        assert any(n.lower().startswith(dist + "-") for n in names), (dist, names)
    assert pack["wheel"] == next(f"wheels/{n}" for n in names if n.startswith("edgert-"))
    assert {f"bundle/{n}" for n in ["manifest.json", *bundle.manifest["files"]]} == {
        n for n in pack["members"] if n.startswith("bundle/")}
    assert "pack: wrote" in archives["one-stdout"] and "downloading" in archives["one-stdout"]
    assert not [p for p in archive.parent.iterdir() if p.name.endswith(".tmp")]  # renamed


def test_install_offline_from_the_archive_answers(board, archives):
    r = board.bootstrap_install(archives["one"])
    assert r.returncode == 0, r.stdout + r.stderr
    rid = _pack_json(archives["one"])["bundle"]["release_id"]
    assert board.current() == rid
    out = r.stdout + r.stderr
    assert re.search(r"verified \d+ members \(.*\) in", out)
    assert "--no-index --find-links" in out and "sent READY=1" in out
    assert board.trap.hits == []  # pip never asked an index: the archive was enough
    assert board.answers() == "tiny-one"
    # the runtime came from the archive's wheels, into the release's venv
    venv = (board.root / "releases" / rid / "venv").resolve()
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    site = next((venv / "lib").glob("python*/site-packages"))
    installed = dict(d.name[: -len(".dist-info")].lower().split("-", 1)
                     for d in site.glob("*.dist-info"))
    wheels = {n.split("/")[1].split("-")[0].lower(): n.split("/")[1].split("-")[1]
              for n in _pack_json(archives["one"])["members"] if n.startswith("wheels/")}
    for dist in RUNTIME:
        assert installed.get(dist) == wheels[dist], (dist, installed.get(dist), wheels[dist])
    assert not (board.root / "staging").exists()  # cleaned up
    assert (board.root / "bin" / "edgert").resolve() == (venv / "bin" / "edgert")
    # the control: the venv's pip in the same environment, without --no-index, reaches the trap
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "download", "--no-deps", "-q",
                    "-d", str(board.tmp / "control"), "six"], env=board.trap.env(),
                   capture_output=True, timeout=120)
    assert any("/simple/six/" in h for h in board.trap.hits), board.trap.hits
    board.trap.hits.clear()


def test_broken_bundle_is_rolled_back(board, archives):
    first = board.current()
    r = board.install(archives["broken"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "reusing" in r.stdout and "installing edgert" not in r.stdout  # same wheel, venv
    assert board.trap.hits == []
    assert "before READY=1" in r.stderr and f"rolled back to {first}, which answers" in r.stderr
    assert "edgert install: error: release" in r.stderr
    assert board.current() == first
    assert board.answers() == "tiny-one"
    broken = _pack_json(archives["broken"])["bundle"]["release_id"]
    assert Layout(board.root).meta(broken)["status"] == "failed"


def test_flipped_byte_is_refused_before_anything_is_written(board, archives, tmp_path):
    corrupt = tmp_path / "corrupt.tar"
    shutil.copy(archives["one"], corrupt)
    with tarfile.open(corrupt) as tar:
        info = tar.getmember("bundle/model.onnx.data")
    with open(corrupt, "r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    before, current = _tree(board.root), board.current()
    r = board.install(corrupt)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "member bundle/model.onnx.data: sha256 does not match PACK.json" in r.stderr
    assert "unpacked" not in r.stdout and "board:" not in r.stdout
    assert _tree(board.root) == before  # nothing unpacked, nothing switched
    assert board.current() == current and board.answers() == "tiny-one"


def test_clear_errors_without_tracebacks(board, archives, tmp_path):
    def install(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "edgert", "install", *args, "--root",
                            str(tmp_path / "root")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    r = install(str(tmp_path / "missing.tar"), "--user", board.user)
    assert r.returncode == 1 and "no such file" in r.stderr
    (tmp_path / "junk.tar").write_bytes(os.urandom(2048))
    r = install(str(tmp_path / "junk.tar"), "--user", board.user)
    assert r.returncode == 1 and "not a tar archive" in r.stderr
    r = install(str(archives["one"]), "--user", "no-such-user-here")
    assert r.returncode == 1 and "does not exist on this board" in r.stderr
    r = install(str(archives["one"]), "--user", board.user, "--python", "/nonexistent/python")
    assert r.returncode == 1 and "not found" in r.stderr
    r = install("--help")
    assert r.returncode == 0 and "PYTHONPATH" in r.stdout and "exit status" in r.stdout

    def pack(*args: str) -> subprocess.CompletedProcess:
        return _pack(*args)

    r = pack(str(archives["one-bundle"]), "-o", str(tmp_path / "x.tar.gz"))
    assert r.returncode == 1 and "uncompressed tar" in r.stderr
    r = pack(str(tmp_path / "nope"), "-o", str(tmp_path / "x.tar"))
    assert r.returncode == 1 and "not a bundle directory" in r.stderr
    r = pack(str(archives["one-bundle"]), "-o", str(tmp_path / "x.tar"), "--device", "nope")
    assert r.returncode == 1 and "unknown device profile" in r.stderr
    r = pack(str(archives["one-bundle"]), "-o", str(tmp_path / "x.tar"), "--device",
             "orin-nano-8gb", "--platform", "x86_64")
    assert r.returncode == 1 and "Jetson (aarch64)" in r.stderr
    assert not (tmp_path / "x.tar").exists()
    r = pack("--help")
    assert r.returncode == 0 and "uncompressed tar" in r.stdout


# ---- a Jetson's archive (not installable here) -----------------------------------------------

def test_pack_for_aarch64_python310(board, archives, tmp_path):
    out = tmp_path / "jetson.tar"
    r = _pack(str(archives["one-bundle"]), "-o", str(out), "--platform", "aarch64",
              "--python-version", "3.10", "--device", "orin-nano-8gb")
    if r.returncode != 0 and re.search(r"NewConnectionError|Max retries|Name or service not "
                                       r"known|Temporary failure in name resolution|Network is "
                                       r"unreachable|ConnectTimeout", r.stderr + r.stdout):
        pytest.skip("pip download for aarch64 needs the package index, unreachable here")
    assert r.returncode == 0, r.stderr
    pack = _pack_json(out)
    assert pack["target"]["machine"] == "aarch64" and pack["target"]["python"] == "3.10"
    assert pack["device"] == "orin-nano-8gb"
    wheels = [n.split("/")[1] for n in pack["members"] if n.startswith("wheels/")]
    for dist in ("numpy", "onnxruntime"):
        found = [w for w in wheels if w.lower().startswith(dist + "-")]
        assert len(found) == 1 and "-cp310-" in found[0] and "aarch64" in found[0], found
    assert not [w for w in wheels if "x86_64" in w]
    # and it is refused here, before anything is written
    before = _tree(board.root)
    r = board.install(out)
    assert r.returncode == 1 and "packed for aarch64" in r.stderr and "this board is" in r.stderr
    assert _tree(board.root) == before
