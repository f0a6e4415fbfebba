"""`edgert install FILE.tar`: the board side of `edgert pack`, for a board without network.

1. Every member of the archive is checked against PACK.json (size and sha256, nothing missing,
   nothing extra, no unsafe path) BEFORE anything is written: a corrupt archive is refused
   naming the member, and the board is untouched.
2. The archive is unpacked into ROOT/staging/<id>/ (hashed again on the way, so a file that
   changed between the two reads is refused too).
3. Then what `edgert deploy` does over ssh, with the same functions of edgert/tools/board.py:
   `ensure_venv` (a venv with --system-site-packages, reused while the wheel is the same; here
   `pip install --no-index --find-links` of the packed wheels only), `prepare_release`, the
   bundle moved into releases/<id>/bundle, then the new venv's `edgert board activate`:
   verification against the bundle's manifest, units, the `current` switch, READY=1, one
   completion through the socket, and rollback to the previous release if any of it fails.

Like board.py, this module imports only the standard library at the top, so that a board with
no edgert yet can run it from the packed wheel:

    tar -xf FILE.tar --wildcards 'wheels/edgert-*.whl'
    PYTHONPATH="$(echo wheels/edgert-*.whl)" python3 -m edgert.tools.install FILE.tar
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from edgert.tools import board
from edgert.tools.board import (
    DEFAULT_ROOT,
    EXIT_REFUSED,
    BoardError,
    Layout,
    add_service_args,
    add_start_args,
    outcome,
)

PACK_MANIFEST = "PACK.json"
PACK_FORMAT = "edgert-pack"
PACK_FORMAT_VERSION = 1
MEMBER_ROOTS = ("wheels", "bundle")
MACHINES = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}


class InstallError(BoardError):
    """A refusal for the operator; printed as `edgert install: error: ...`."""


def say(msg: str) -> None:
    print(f"install: {msg}", flush=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def host_machine() -> str:
    m = platform.machine().lower()
    return MACHINES.get(m, m)


class Progress:
    """`prefix: verb 45% (1.2 of 2.6 GiB)`, at most once per `every` seconds."""

    def __init__(self, prefix: str, verb: str, total: int, every: float = 2.0):
        self.prefix, self.verb, self.total, self.every = prefix, verb, total, every
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.total:
            self.last = now
            print(f"{self.prefix}: {self.verb} {100 * self.done / self.total:.0f}% "
                  f"({mib(self.done)} of {mib(self.total)})", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class HashingReader:
    """A file object that hashes (and counts for `progress`) what is read through it."""

    def __init__(self, f: BinaryIO, progress: Progress | None = None):
        self.f, self.progress = f, progress
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        if self.progress is not None:
            self.progress.add(len(data))
        return data


def safe_member_name(name: str) -> bool:
    p = PurePosixPath(name)
    return (not p.is_absolute() and len(p.parts) >= 2 and p.parts[0] in MEMBER_ROOTS
            and all(part not in ("", ".", "..") for part in p.parts) and "\\" not in name
            and str(p) == name)


# ---- reading and checking the archive --------------------------------------------------------

def open_pack(path: Path) -> tuple[tarfile.TarFile, dict[str, Any], bytes]:
    """The archive and its PACK.json (parsed, and its bytes); refuses what is not a pack."""
    if not path.is_file():
        raise InstallError(f"{path}: no such file")
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - returned open, closed by the caller
    except (tarfile.TarError, OSError) as e:
        raise InstallError(f"{path}: not a tar archive ({e})") from None
    try:
        try:
            info = tar.getmember(PACK_MANIFEST)
        except KeyError:
            raise InstallError(f"{path}: no {PACK_MANIFEST} in the archive: not made by "
                               "`edgert pack`, or truncated") from None
        except (tarfile.TarError, OSError) as e:
            raise InstallError(f"{path}: the archive is corrupt ({e})") from None
        f = tar.extractfile(info)
        raw = f.read() if f is not None else b""
        try:
            pack = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InstallError(f"{path}: {PACK_MANIFEST} is not valid JSON ({e}): the archive "
                               "is corrupt") from None
        if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT:
            raise InstallError(f"{path}: {PACK_MANIFEST} is not an edgert pack manifest")
        if pack.get("format_version") != PACK_FORMAT_VERSION:
            raise InstallError(f"{path}: pack format version {pack.get('format_version')!r}; "
                               f"this edgert reads version {PACK_FORMAT_VERSION}")
        members = pack.get("members")
        if not isinstance(members, dict) or pack.get("wheel") not in members:
            raise InstallError(f"{path}: {PACK_MANIFEST} lists no members or no edgert wheel")
        for name in members:
            if not safe_member_name(name):
                raise InstallError(f"{path}: {PACK_MANIFEST} lists an unsafe path {name!r}")
        return tar, pack, raw
    except BaseException:
        tar.close()
        raise


def _members(tar: tarfile.TarFile, path: Path, pack: dict[str, Any]) -> list[tarfile.TarInfo]:
    """The archive's file members in order, each listed in PACK.json, none missing."""
    listed = pack["members"]
    seen: dict[str, tarfile.TarInfo] = {}
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, OSError) as e:
        raise InstallError(f"{path}: the archive is corrupt ({e})") from None
    for info in infos:
        if info.name == PACK_MANIFEST or (info.isdir() and info.name.rstrip("/") in MEMBER_ROOTS):
            continue
        if info.name not in listed:
            raise InstallError(f"{path}: member {info.name!r} is not listed in {PACK_MANIFEST}")
        if not info.isfile():
            raise InstallError(f"{path}: member {info.name} is not a regular file")
        if info.name in seen:
            raise InstallError(f"{path}: member {info.name} appears twice")
        seen[info.name] = info
    missing = sorted(set(listed) - set(seen))
    if missing:
        raise InstallError(f"{path}: member {missing[0]} listed in {PACK_MANIFEST} is missing "
                           f"from the archive ({len(missing)} missing; truncated or a corrupt "
                           "tar header)")
    return [seen[i.name] for i in infos if i.name in seen]


def _check_member(path: Path, info: tarfile.TarInfo, want: dict[str, Any],
                  reader: HashingReader) -> None:
    if reader.size != want["bytes"] or info.size != want["bytes"]:
        raise InstallError(f"{path}: member {info.name}: {reader.size} bytes, {PACK_MANIFEST} "
                           f"says {want['bytes']}: the archive is corrupt; nothing was installed")
    if reader.sha.hexdigest() != want["sha256"]:
        raise InstallError(f"{path}: member {info.name}: sha256 does not match {PACK_MANIFEST}: "
                           "the archive is corrupt; nothing was installed")


def verify_pack(tar: tarfile.TarFile, path: Path, pack: dict[str, Any]) -> list[tarfile.TarInfo]:
    """Read every member once against PACK.json, writing nothing."""
    infos = _members(tar, path, pack)
    total = sum(i.size for i in infos)
    say(f"verifying {len(infos)} members ({mib(total)}) against {PACK_MANIFEST}")
    progress = Progress("install", "verified", total)
    for info in infos:
        try:
            f = tar.extractfile(info)
            assert f is not None
            reader = HashingReader(f, progress)
            while reader.read(1 << 20):
                pass
        except (tarfile.TarError, OSError) as e:
            raise InstallError(f"{path}: member {info.name}: cannot be read ({e}): the archive "
                               "is corrupt or truncated; nothing was installed") from None
        _check_member(path, info, pack["members"][info.name], reader)
    say(f"verified {len(infos)} members ({mib(total)}) in {progress.elapsed():.1f} s")
    return infos


def unpack(tar: tarfile.TarFile, path: Path, pack: dict[str, Any],
           infos: list[tarfile.TarInfo], dest: Path) -> None:
    """Write the members under `dest` (regular files only, modes 0644/0755), hashing them again
    on the way."""
    total = sum(i.size for i in infos)
    progress = Progress("install", "unpacked", total)
    for info in infos:
        out = dest / info.name
        out.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        f = tar.extractfile(info)
        assert f is not None
        reader = HashingReader(f, progress)
        with open(out, "wb") as w:
            shutil.copyfileobj(reader, w, 1 << 20)  # type: ignore[misc]
        os.chmod(out, 0o644)
        _check_member(path, info, pack["members"][info.name], reader)
    say(f"unpacked {len(infos)} members ({mib(total)}) into {dest} in "
        f"{progress.elapsed():.1f} s")


# ---- the board ---------------------------------------------------------------------------------

def python_target(python: str) -> tuple[str, str]:
    """(`major.minor`, machine) of the interpreter the venv will be made with."""
    try:
        r = subprocess.run([python, "-c", "import platform, sys; print('%d.%d' % "
                            "sys.version_info[:2], platform.machine())"],
                           capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, PermissionError):
        raise InstallError(f"--python {python}: not found") from None
    if r.returncode != 0:
        raise InstallError(f"--python {python}: does not run ({r.stderr.strip()[-300:]})")
    version, machine = r.stdout.split()
    return version, MACHINES.get(machine.lower(), machine.lower())


def check_target(pack: dict[str, Any], python: str) -> None:
    target = pack.get("target") or {}
    version, machine = python_target(python)
    want_m, want_v = target.get("machine"), target.get("python")
    if want_m and want_m != machine:
        raise InstallError(f"this archive was packed for {want_m} (Python {want_v}); this "
                           f"board is {machine}: pack it again with --platform {machine}")
    if want_v and want_v != version:
        raise InstallError(f"this archive was packed for Python {want_v}; {python} is Python "
                           f"{version}: pack it again with --python-version {version}, or pass "
                           f"--python with a Python {want_v} interpreter")


def check_options(args: argparse.Namespace) -> None:
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        raise InstallError(f"user {args.user!r} does not exist on this board; create it "
                           "(useradd --system --no-create-home --shell /usr/sbin/nologin "
                           "edgert) or pass --user") from None
    if args.device:
        import devices

        try:
            devices.load(args.device)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise InstallError(f"--device {args.device}: {e}") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pip_env() -> dict[str, str]:
    """pip's environment: the board's pip configuration files are not read (an index, a
    find-links directory or constraints there must not change what is installed), unless
    PIP_CONFIG_FILE names one; the command line has --no-index."""
    env = dict(os.environ)
    env.setdefault("PIP_CONFIG_FILE", os.devnull)
    return env


def _place_bundle(staged: Path, rel: Path) -> None:
    """Move the unpacked bundle into releases/<id>/bundle (same filesystem: renames), replacing
    what a previous install or an interrupted copy left there."""
    target = rel / "bundle"
    old = rel / f".bundle.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def _activate_argv(args: argparse.Namespace, venv: Path, rid: str, root: Path) -> list[str]:
    cmd = [str(venv / "bin" / "edgert"), "board", "activate", "--root", str(root),
           "--release", rid, "--venv", str(venv), "--user", args.user, "--socket", args.socket,
           "--kv-memory", args.kv_memory, "--mode", args.mode, "--unit-dir", args.unit_dir]
    if args.timeout is not None:
        cmd += ["--timeout", str(args.timeout)]
    if args.group:
        cmd += ["--group", args.group]
    if args.device:
        cmd += ["--device", args.device]
    if args.serve_args:
        cmd += [f"--serve-args={args.serve_args}"]  # "=": a single flag is a value too
    return cmd


def install(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    path = Path(args.archive)
    python = args.python or sys.executable
    check_options(args)
    tar, pack, raw = open_pack(path)
    with tar:
        bundle_info = pack.get("bundle") or {}
        target = pack.get("target") or {}
        say(f"{path}: {bundle_info.get('name')} with edgert {pack.get('edgert_version')}, "
            f"packed for {target.get('machine')} / Python {target.get('python')}"
            + (f" / {pack['device']}" if pack.get("device") else ""))
        check_target(pack, python)
        if args.device is None:
            args.device = pack.get("device")
        infos = verify_pack(tar, path, pack)  # before anything is written

        rid = args.release_id or bundle_info.get("release_id")
        if not rid:
            raise InstallError(f"{path}: {PACK_MANIFEST} has no release id; pass --release-id")
        root = Path(args.root).resolve()
        layout = Layout(root)
        layout.release(rid)  # a bad id is refused here
        total = sum(i.size for i in infos)
        free = shutil.disk_usage(_existing_parent(root)).free
        if free < total * 1.1 + (64 << 20):
            raise InstallError(f"{root}: {mib(free)} free, unpacking needs about "
                               f"{mib(int(total * 1.1))} (plus the venv); nothing was installed")
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".install.lock", "a")  # noqa: SIM115 - held until the end
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InstallError(f"another `edgert install` is running under {root}") from None
            pack_id = hashlib.sha256(raw).hexdigest()[:12]
            staging = root / "staging" / f"{pack_id}-{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            try:
                unpack(tar, path, pack, infos, staging)
                wheel = staging / pack["wheel"]
                venv, _ = board.ensure_venv(
                    layout, wheel, python,
                    ["--no-index", "--find-links", str(staging / "wheels")], env=_pip_env(),
                    source=f"the packed wheels only (--no-index --find-links {staging}/wheels)")
                rel = board.prepare_release(layout, rid)
                _place_bundle(staging / "bundle", rel)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):
                    (root / "staging").rmdir()
            say(f"release {rid}: activating with {venv}/bin/edgert board activate")
            r = subprocess.run(_activate_argv(args, venv, rid, root))
        finally:
            lock.close()
    if r.returncode == 0:
        say(f"installed {rid} in {time.monotonic() - t0:.1f} s: serving on {args.socket}")
        return 0
    print(f"edgert install: error: {outcome(r.returncode, rid)}", file=sys.stderr, flush=True)
    return r.returncode


def _run(args: argparse.Namespace) -> int:
    try:
        return install(args)
    except BoardError as e:
        print(f"edgert install: error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except (OSError, tarfile.TarError) as e:  # e.g. a root that is not writable
        print(f"edgert install: error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", metavar="FILE.tar", help="an archive made by `edgert pack`")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"the install root ({DEFAULT_ROOT}); "
                   "the same layout as `edgert deploy`'s")
    p.add_argument("--device", metavar="PROFILE", default=None,
                   help="device profile for edgert serve (default: the one it was packed for)")
    p.add_argument("--release-id", help="release name (default: <bundle name>-<manifest hash>, "
                   "the same as `edgert deploy`'s)")
    p.add_argument("--python", help="interpreter for the venv (default: the one running this; "
                   "must be the Python the archive was packed for)")
    g = p.add_argument_group("the service (as for edgert deploy)")
    add_service_args(g)
    add_start_args(g)
    p.set_defaults(func=_run)


DESCRIPTION = (
    "Install an archive made by `edgert pack` on this board, without network:\n"
    "  1. every member is checked against the archive's PACK.json (size, sha256) before\n"
    "     anything is written; a corrupt archive is refused naming the member\n"
    "  2. it is unpacked under ROOT/staging/, edgert and its dependencies are installed into a\n"
    "     venv (--system-site-packages, so JetPack's TensorRT is visible) with\n"
    "     `pip install --no-index --find-links` from the packed wheels only (reused while the\n"
    "     wheel is the same)\n"
    "  3. then as `edgert deploy`: the bundle verified against its manifest, the units rendered,\n"
    "     `current` switched, the service restarted, READY=1 awaited, one completion answered\n"
    "     through the socket; a release that does not get there is rolled back.")
EPILOG = (
    "on a board without edgert (run the installer from the packed wheel):\n"
    "  tar -xf edgert-pack.tar --wildcards 'wheels/edgert-*.whl'\n"
    "  sudo env PYTHONPATH=\"$(echo wheels/edgert-*.whl)\" python3 -m edgert.tools.install \\\n"
    "      edgert-pack.tar --device orin-nano-8gb\n"
    "later archives: sudo /opt/edgert/bin/edgert install edgert-pack.tar\n\n"
    "exit status: 0 installed and answering; 1 refused, nothing switched (corrupt archive, "
    "wrong platform, bad arguments, pip failed); 3 the new release failed and the previous one "
    "serves again; 4 nothing serves")


def register(sub) -> None:
    p = sub.add_parser("install", help="install an `edgert pack` archive on this board "
                       "(offline) and start it", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgert.tools.install FILE.tar ...`: before edgert is installed on the board
    (the packed wheel on PYTHONPATH)."""
    parser = argparse.ArgumentParser(prog="edgert install", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
