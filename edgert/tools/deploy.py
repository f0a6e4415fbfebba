"""`edgert deploy BUNDLE --to USER@HOST`: put a bundle and a runtime-only edgert on a board and
start it, over the system's ssh and rsync.

1. The bundle is checked here (every sha256), and a wheel of this edgert is built once per
   source tree (`pip wheel --no-deps`, cached under .cache/edgert/wheels).
2. The wheel goes to the board, which installs it into a venv of its own (--system-site-packages,
   so JetPack's tensorrt is visible; dependencies from the board's package index), reused while
   the wheel's sha256 is the same (`edgert board ensure-venv`).
3. The bundle is copied with rsync into releases/<id>/bundle (resumable: an interrupted copy
   keeps its partial file and the next run sends only the rest). No --link-dest: rsync's
   quick check (size and mtime) would hard-link a different file of the same size and second
   from the current release, which the verification then refuses; linking files by their
   manifest sha256 is left to do.
4. `edgert board activate` on the board verifies every file against the manifest BEFORE switching
   `current`, installs the units, restarts the service, waits for READY=1, sends one completion
   through the socket and, if any of it fails, switches back to the previous release.

All board-side logic is edgert/tools/board.py; this module only moves files and runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgert.bundle import MANIFEST, Bundle, BundleError, sha256_file
from edgert.tools.board import (
    DEFAULT_ROOT,
    EXIT_DOWN,
    EXIT_ROLLED_BACK,
    add_service_args,
    add_start_args,
    outcome,
)

SOURCE_PARTS = ("edgert", "export", "devices", "pyproject.toml", "README.md")


class DeployError(ValueError):
    """A refusal for the operator; printed as `edgert deploy: error: ...`."""


# ---- the wheel -------------------------------------------------------------------------------

def source_root() -> Path:
    import edgert

    root = Path(edgert.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "edgert").is_dir():
        raise DeployError(f"edgert is installed from a wheel ({root}), not a source checkout: "
                          "pass --wheel FILE")
    return root


def _source_files(root: Path) -> list[Path]:
    files = []
    for part in SOURCE_PARTS:
        p = root / part
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                      and not f.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in
                      str(f.relative_to(root))]
    return sorted(files)


def cache_dir() -> Path:
    env = os.environ.get("EDGERT_CACHE")
    return Path(env) if env else source_root() / ".cache" / "edgert"


def build_wheel(root: Path, cache: Path) -> Path:
    """`pip wheel --no-deps` of the source tree, cached by a hash of the files that go into it,
    so redeploying unchanged code ships the same wheel (and the board reuses its venv)."""
    h = hashlib.sha256()
    for f in _source_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    out = cache / "wheels" / h.hexdigest()[:16]
    found = sorted(out.glob("edgert-*.whl")) if out.is_dir() else []
    if found:
        print(f"wheel: {found[0].name} (cached, {out})", flush=True)
        return found[0]
    print("wheel: building edgert (pip wheel --no-deps)", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgert-wheel-") as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
        for part in SOURCE_PARTS:
            p = root / part
            if p.is_dir():
                shutil.copytree(p, src / part, ignore=ignore)
            elif p.is_file():
                src.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, src / part)
        import importlib.util

        isolation = [] if importlib.util.find_spec("setuptools") is None else [
            "--no-build-isolation"]
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "--disable-pip-version-check", *isolation, "-w",
                            str(Path(tmp) / "dist"), str(src)],
                           env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise DeployError(f"pip wheel failed:\n{r.stdout}{r.stderr}")
        wheel = next((Path(tmp) / "dist").glob("edgert-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, out / f".{wheel.name}.tmp")
        os.replace(out / f".{wheel.name}.tmp", out / wheel.name)
    print(f"wheel: {wheel.name} -> {out}", flush=True)
    # keep the newest few builds: each source change makes one
    builds = sorted((d for d in out.parent.iterdir() if d.is_dir() and d != out),
                    key=lambda d: d.stat().st_mtime)
    for old in builds[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    return out / wheel.name


def release_id(bundle: Bundle) -> str:
    """<bundle name>-<sha256 of the manifest>: the same bundle is the same release (so an
    interrupted copy resumes into the same directory), another bundle is a new one."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", bundle.name).strip(".-") or "bundle"
    digest = hashlib.sha256((bundle.path / MANIFEST).read_bytes()).hexdigest()[:12]
    return f"{name[:40]}-{digest}"


# ---- ssh and rsync ----------------------------------------------------------------------------

class Remote:
    def __init__(self, args: argparse.Namespace):
        if not args.to or "@" not in args.to or args.to.startswith("@") or args.to.endswith("@"):
            raise DeployError(f"--to {args.to!r}: expected USER@HOST")
        self.target = args.to
        self.root = args.root
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if args.ssh_config:
            if not Path(args.ssh_config).is_file():
                raise DeployError(f"--ssh-config {args.ssh_config}: no such file")
            ssh += ["-F", args.ssh_config]
        if args.port:
            ssh += ["-p", str(args.port)]
        if args.identity:
            if not Path(args.identity).is_file():
                raise DeployError(f"--identity {args.identity}: no such file")
            ssh += ["-i", args.identity]
        for tool in ("ssh", "rsync"):
            if shutil.which(tool) is None:
                raise DeployError(f"{tool} is not installed here (scripts/system_deps.sh "
                                  "installs openssh-client and rsync)")
        self.ssh = ssh

    def run(self, argv: list[str], capture: bool = False) -> subprocess.CompletedProcess:
        """Run argv on the board (quoted for its shell). stderr always reaches the terminal."""
        cmd = [*self.ssh, self.target, shlex.join(argv)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
        if r.returncode == 255:
            raise DeployError(f"ssh {self.target} failed (exit 255): see ssh's message above")
        return r

    def rsync(self, sources: list[str], dest: str, extra: list[str], show: bool = True
              ) -> dict[str, int]:
        """rsync to the board, its progress on stdout (`show`); returns its --stats numbers."""
        cmd = ["rsync", "-e", shlex.join(self.ssh), *extra, "--stats", *sources,
               f"{self.target}:{dest}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        tail = b""
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                tail = (tail + chunk)[-16384:]
                if show and b"Number of files:" not in tail:  # progress, not the stats
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            print("\nedgert deploy: interrupted during the copy; the partial file is kept on "
                  "the board and the same command resumes it", file=sys.stderr, flush=True)
            raise
        if code != 0:
            meaning = {20: "interrupted", 23: "some files could not be transferred",
                       30: "timed out", 12: "protocol error (is rsync installed on the board?)",
                       255: "ssh failed"}.get(code, "see rsync's message above")
            raise DeployError(f"rsync to {self.target}:{dest} failed (exit {code}: {meaning}); "
                              "run the same command again to resume the copy")
        stats = {}
        for line in tail.decode(errors="replace").replace("\r", "\n").splitlines():
            key, _, value = line.partition(":")
            number = value.strip().split(" ")[0].replace(",", "")
            if number.isdigit():
                stats[key.strip()] = int(number)
        return stats


# ---- the command ------------------------------------------------------------------------------

def _board(remote: Remote, venv: str | None = None) -> list[str]:
    exe = f"{venv}/bin/edgert" if venv else f"{remote.root}/bin/edgert"
    return [exe, "board"]


def _echo_json(stdout: str) -> dict:
    """A board command's output: progress lines, then one JSON line (its answer)."""
    lines = stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise DeployError(f"unexpected answer from the board: {stdout[-500:]!r}") from None


def _service_args(args: argparse.Namespace) -> list[str]:
    out = ["--mode", args.mode]
    if args.timeout is not None:
        out += ["--timeout", str(args.timeout)]
    return out


def _need_installed(remote: Remote, r: subprocess.CompletedProcess) -> None:
    if r.returncode == 127:
        raise DeployError(f"nothing is deployed under {remote.root} on {remote.target} "
                          f"({remote.root}/bin/edgert is missing)")


def deploy(args: argparse.Namespace) -> int:
    remote = Remote(args)
    if args.list:
        r = remote.run([*_board(remote), "list", "--root", args.root])
        _need_installed(remote, r)
        return r.returncode
    if args.rollback:
        r = remote.run([*_board(remote), "rollback", "--root", args.root,
                        *(["--to", args.release_id] if args.release_id else []),
                        *_service_args(args)])
        _need_installed(remote, r)
        if r.returncode:
            print(f"edgert deploy: error: rollback on {remote.target} failed (exit "
                  f"{r.returncode}; see above)", file=sys.stderr)
        return r.returncode
    if not args.bundle:
        raise DeployError("give a BUNDLE to deploy (or --list / --rollback)")
    if args.device:
        import devices

        try:
            devices.load(args.device)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise DeployError(f"--device {args.device}: {e}") from None
    t0 = time.monotonic()
    print(f"bundle: checking {args.bundle}", flush=True)
    bundle = Bundle.load(args.bundle, verify=True)
    rid = args.release_id or release_id(bundle)
    wheel = Path(args.wheel) if args.wheel else build_wheel(source_root(), cache_dir())
    if not wheel.is_file():
        raise DeployError(f"--wheel {wheel}: no such file")
    wsha = sha256_file(wheel)
    wdir = f"{args.root}/wheels/{wsha[:16]}"

    print(f"board: {remote.target}:{args.root}, release {rid}", flush=True)
    r = remote.run(["mkdir", "-p", "--", wdir])
    if r.returncode:
        raise DeployError(f"cannot create {wdir} on {remote.target} (exit {r.returncode})")
    remote.rsync([str(wheel)], f"{wdir}/", ["-t", "--chmod=F0644"], show=False)
    r = remote.run(["env", f"PYTHONPATH={wdir}/{wheel.name}", args.python, "-m",
                    "edgert.tools.board", "ensure-venv", "--root", args.root,
                    "--wheel", f"{wdir}/{wheel.name}",
                    *([f"--pip-args={args.pip_args}"] if args.pip_args else [])], capture=True)
    if r.returncode == 127:
        raise DeployError(f"--python {args.python}: not found on {remote.target}")
    if r.returncode:
        raise DeployError(f"installing edgert on {remote.target} failed (exit {r.returncode}; "
                          "see above)")
    venv = _echo_json(r.stdout)["venv"]

    r = remote.run([*_board(remote, venv), "prepare", "--root", args.root, "--release", rid],
                   capture=True)
    if r.returncode:
        raise DeployError(f"preparing release {rid} failed (exit {r.returncode}; see above)")
    state = _echo_json(r.stdout)
    root_abs = state["root"]
    extra = ["-rlt", "--partial", "--partial-dir=.rsync-partial", "--delete",
             "--chmod=D0755,F0644", "--info=progress2", "--no-inc-recursive"]
    if args.bwlimit:
        extra.append(f"--bwlimit={args.bwlimit}")
    if args.checksum:
        extra.append("--checksum")
    print(f"copy: {bundle.path} -> {remote.target}:{root_abs}/releases/{rid}/bundle", flush=True)
    stats = remote.rsync([f"{bundle.path}/"], f"{root_abs}/releases/{rid}/bundle/", extra)
    sent = stats.get("Total bytes sent", -1)
    print(f"copy: done, sent {sent} bytes for {stats.get('Total file size', 0)} bytes of "
          f"bundle ({stats.get('Number of regular files transferred', 0)} files transferred)",
          flush=True)

    cmd = [*_board(remote, venv), "activate", "--root", args.root, "--release", rid,
           "--venv", venv, "--user", args.user, "--socket", args.socket,
           "--kv-memory", args.kv_memory, *_service_args(args)]
    if args.group:
        cmd += ["--group", args.group]
    if args.device:
        cmd += ["--device", args.device]
    if args.serve_args:
        cmd += [f"--serve-args={args.serve_args}"]  # "=": a single flag is a value too
    r = remote.run(cmd)
    if r.returncode == 0:
        print(f"deployed {rid} to {remote.target} in {time.monotonic() - t0:.1f} s: serving on "
              f"{args.socket}", flush=True)
        return 0
    msg = outcome(r.returncode, rid, remote.target)
    if r.returncode not in (EXIT_ROLLED_BACK, EXIT_DOWN):
        msg += (". If a file on the board is corrupt, rerun with --checksum to re-send files "
                "whose content differs")
    print(f"edgert deploy: error: {msg}", file=sys.stderr, flush=True)
    return r.returncode


def _run(args: argparse.Namespace) -> int:
    try:
        return deploy(args)
    except (DeployError, BundleError) as e:
        print(f"edgert deploy: error: {e}", file=sys.stderr, flush=True)
        return 1


def register(sub) -> None:
    p = sub.add_parser(
        "deploy", help="copy a bundle and edgert to a board over ssh/rsync and start it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deploy BUNDLE to a board over ssh and rsync:\n"
                    "  1. a runtime-only edgert: a wheel built here, installed on the board into\n"
                    "     a venv with --system-site-packages (reused while the wheel is the same)\n"
                    "  2. the bundle copied into ROOT/releases/<id>/ (resumable: rerun after an\n"
                    "     interruption) and verified there against the manifest's sha256\n"
                    "  3. systemd units rendered for the release, the `current` symlink switched,\n"
                    "     the service restarted, READY=1 awaited and one completion answered\n"
                    "     through its socket; a release that does not get there is rolled back\n"
                    "     to the previous one automatically.\n"
                    "Where systemd is not PID 1 on the board, it runs the unit's ExecStart itself.",
        epilog="examples:\n"
               "  edgert deploy bundles/smollm2-int4-trt --to root@jetson --device orin-nano-8gb\n"
               "  edgert deploy --to root@jetson --list\n"
               "  edgert deploy --to root@jetson --rollback\n\n"
               "exit status: 0 deployed and answering; 1 refused before the switch (bad "
               "bundle, corrupt copy, ssh/rsync failure); 3 the new release failed and the "
               "previous one serves again; 4 nothing serves; 130 interrupted (rerun to resume)")
    p.add_argument("bundle", nargs="?", help="bundle directory to deploy")
    p.add_argument("--to", required=True, metavar="USER@HOST", help="the board, for ssh")
    p.add_argument("--device", metavar="PROFILE", help="device profile passed to edgert serve "
                   "on the board (devices/*.json: orin-nano-8gb, ...)")
    p.add_argument("--list", action="store_true", help="list the releases on the board")
    p.add_argument("--rollback", action="store_true",
                   help="switch the board back to the previous release (or --release-id)")
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help=f"deploy root on the board ({DEFAULT_ROOT})")
    p.add_argument("--release-id", help="release name (default: <bundle name>-<manifest hash>)")
    g = p.add_argument_group("ssh and copy")
    g.add_argument("--ssh-config", metavar="FILE", help="ssh -F FILE")
    g.add_argument("--port", type=int, help="ssh port")
    g.add_argument("--identity", metavar="FILE", help="ssh -i FILE")
    g.add_argument("--bwlimit", metavar="KBPS", help="rsync --bwlimit (a slow link)")
    g.add_argument("--checksum", action="store_true",
                   help="compare files on the board by content, not size and time (re-sends a "
                        "file corrupted there)")
    g = p.add_argument_group("install on the board")
    g.add_argument("--python", default="python3",
                   help="the board's interpreter for the venv (python3)")
    g.add_argument("--pip-args", help="extra `pip install` arguments on the board, one string: "
                   "--pip-args='--no-index --find-links DIR' (a single flag needs the =: "
                   "--pip-args=--no-compile)")
    g.add_argument("--wheel", metavar="FILE", help="deploy this edgert wheel instead of "
                   "building one from this checkout")
    g = p.add_argument_group("the service on the board")
    add_service_args(g)
    add_start_args(g, unit_dir=False)
    p.set_defaults(func=_run)
