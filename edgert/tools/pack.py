"""`edgert pack BUNDLE -o FILE.tar`: everything an air-gapped board needs, in one archive, made
where the package index is reachable; `edgert install FILE.tar` (edgert/tools/install.py) puts it
on the board.

The archive (an uncompressed tar: the weights do not compress, and a plain tar is read back
member by member without unpacking it):

    PACK.json                 first member: what it was built for (machine, Python, manylinux
                              tags), the edgert version, the device profile, the release id,
                              and the size and sha256 of every other member
    wheels/edgert-*.whl       this edgert (deploy.build_wheel: `pip wheel --no-deps`, cached)
    wheels/*.whl              its runtime dependencies for the board: `pip download
                              --only-binary=:all: --platform manylinux_2_28_<arch> ...
                              --platform manylinux2014_<arch> --python-version X.Y` of the
                              edgert wheel (so exactly its Requires-Dist)
    bundle/...                the bundle's manifest and every file it lists

It is written to a temporary file beside FILE and renamed over it once complete.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from edgert.bundle import MANIFEST, Bundle, BundleError, sha256_file
from edgert.tools.deploy import DeployError, build_wheel, cache_dir, release_id, source_root
from edgert.tools.install import (
    PACK_FORMAT,
    PACK_FORMAT_VERSION,
    PACK_MANIFEST,
    HashingReader,
    Progress,
    host_machine,
    mib,
)

PLATFORMS = ("aarch64", "x86_64")
# The newest glibc a packed wheel may need: JetPack 5 (Ubuntu 20.04) has 2.31, JetPack 6 2.35.
MAX_GLIBC_MINOR = 28
COMPRESSED = (".gz", ".tgz", ".xz", ".txz", ".bz2", ".tbz", ".zst", ".lz4", ".zip")


class PackError(ValueError):
    """A refusal for the operator; printed as `edgert pack: error: ...`."""


def say(msg: str) -> None:
    print(f"pack: {msg}", flush=True)


def platform_tags(machine: str) -> list[str]:
    """manylinux_2_28 down to manylinux_2_17 (= manylinux2014, which pip widens to 2010 and 1):
    pip does not widen a manylinux_2_X tag to the older ones by itself."""
    return ([f"manylinux_2_{m}_{machine}" for m in range(MAX_GLIBC_MINOR, 16, -1)]
            + [f"manylinux2014_{machine}"])


def resolve_target(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(machine, python X.Y, device profile name) from the flags, the profile, this machine."""
    profile = None
    if args.device:
        import devices

        try:
            profile = devices.load(args.device)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise PackError(f"--device {args.device}: {e}") from None
    machine = args.platform
    if machine is None and profile is not None and profile.kind == "jetson":
        machine = "aarch64"  # every Jetson module is aarch64
    if profile is not None and profile.kind == "jetson" and machine != "aarch64":
        raise PackError(f"--device {args.device} is a Jetson (aarch64); --platform {machine} "
                        "cannot run there")
    machine = machine or host_machine()
    if machine not in PLATFORMS:
        raise PackError(f"this machine is {platform.machine()}; pass --platform "
                        f"({' or '.join(PLATFORMS)})")
    version = args.python_version
    if version is None and profile is not None and profile.software.python:
        version = profile.software.python
        say(f"Python {version}: what {profile.name}'s OS ships (its profile); --python-version "
            "to change it")
    version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise PackError(f"--python-version {version!r}: expected 3.N, e.g. 3.10")
    return machine, version, (profile.name if profile else None)


def download_wheels(wheel: Path, dest: Path, machine: str, version: str) -> list[Path]:
    """The edgert wheel and its runtime dependencies for the board, binary wheels only."""
    tags = platform_tags(machine)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
           *[a for t in tags for a in ("--platform", t)], "-d", str(dest), str(wheel)]
    say(f"downloading the runtime dependencies for {machine} / CPython {version} "
        f"(manylinux glibc <= 2.{MAX_GLIBC_MINOR}; pip download --only-binary=:all:)")
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise PackError(f"pip download failed (exit {r.returncode}; pip's message is above): "
                        f"a dependency has no wheel for {machine} / CPython {version}, or the "
                        "package index is not reachable from here")
    found = sorted(dest.glob("*.whl"))
    if not (dest / wheel.name).is_file():
        raise PackError(f"pip download did not keep {wheel.name} in {dest}")
    others = [w for w in dest.iterdir() if not w.name.endswith(".whl")]
    if others:
        raise PackError(f"pip download produced non-wheel files: {[w.name for w in others]}")
    return found


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_archive(out: Path, pack: dict[str, Any], files: dict[str, Path]) -> None:
    """PACK.json first, then every file (hashed again while written: a file that changed since
    PACK.json was made is refused), into a temporary file renamed over `out`."""
    members = pack["members"]
    total = sum(m["bytes"] for m in members.values())
    raw = (json.dumps(pack, indent=1, sort_keys=True) + "\n").encode()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    progress = Progress("pack", "written", total)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo(PACK_MANIFEST, len(raw), time.time()), io.BytesIO(raw))
                for name, path in files.items():
                    want = members[name]
                    with open(path, "rb") as src:
                        st = os.fstat(src.fileno())
                        if st.st_size != want["bytes"]:
                            raise PackError(f"{path} changed while packing (size)")
                        reader = HashingReader(src, progress)
                        tar.addfile(_tarinfo(name, want["bytes"], st.st_mtime), reader)
                    if reader.sha.hexdigest() != want["sha256"]:
                        raise PackError(f"{path} changed while packing (sha256)")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    say(f"wrote {len(members) + 1} members ({mib(out.stat().st_size)}) in "
        f"{progress.elapsed():.1f} s")


def pack(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    out = Path(args.output)
    if out.name.lower().endswith(COMPRESSED):
        raise PackError(f"-o {out}: edgert pack writes an uncompressed tar (the weights do not "
                        "compress); name it .tar")
    if out.is_dir():
        raise PackError(f"-o {out}: is a directory; give the archive's file name")
    if not out.parent.is_dir():
        raise PackError(f"-o {out}: the directory {out.parent} does not exist")
    machine, version, device = resolve_target(args)

    say(f"bundle: checking {args.bundle}")
    bundle = Bundle.load(args.bundle, verify=True)  # every sha256, read once here
    rid = release_id(bundle)
    wheel = Path(args.wheel) if args.wheel else build_wheel(source_root(), cache_dir())
    if not wheel.is_file() or not wheel.name.startswith("edgert-") or wheel.suffix != ".whl":
        raise PackError(f"--wheel {wheel}: not an edgert wheel file")
    edgert_version = wheel.name.split("-")[1]

    with tempfile.TemporaryDirectory(prefix="edgert-pack-") as tmp:
        wheels = download_wheels(wheel, Path(tmp) / "wheels", machine, version)
        files: dict[str, Path] = {}
        members: dict[str, dict[str, Any]] = {}
        for w in wheels:
            files[f"wheels/{w.name}"] = w
            members[f"wheels/{w.name}"] = {"bytes": w.stat().st_size, "sha256": sha256_file(w)}
        say(f"{len(wheels)} wheels ({mib(sum(w.stat().st_size for w in wheels))}): "
            + ", ".join(" ".join(w.name.split("-")[:2]) for w in wheels))
        mpath = bundle.path / MANIFEST
        files[f"bundle/{MANIFEST}"] = mpath
        members[f"bundle/{MANIFEST}"] = {"bytes": mpath.stat().st_size,
                                         "sha256": sha256_file(mpath)}
        for name, info in sorted(bundle.manifest["files"].items()):
            # sha256 from the manifest, which Bundle.load just checked against the file
            files[f"bundle/{name}"] = bundle.path / name
            members[f"bundle/{name}"] = {"bytes": info["bytes"], "sha256": info["sha256"]}
        listed = {MANIFEST, *bundle.manifest["files"]}
        extra = sorted(str(p.relative_to(bundle.path)) for p in bundle.path.rglob("*")
                       if p.is_file() and str(p.relative_to(bundle.path)) not in listed)
        if extra:
            say(f"not packed (not in the bundle's manifest): {', '.join(extra[:8])}"
                + (" ..." if len(extra) > 8 else ""))
        pack_manifest = {
            "format": PACK_FORMAT, "format_version": PACK_FORMAT_VERSION,
            "created": time.time(), "edgert_version": edgert_version,
            "wheel": f"wheels/{wheel.name}",
            "target": {"machine": machine, "python": version, "implementation": "cp",
                       "platforms": platform_tags(machine)},
            "device": device,
            "bundle": {"name": bundle.name, "release_id": rid,
                       "precision": bundle.precision,
                       "manifest_sha256": members[f"bundle/{MANIFEST}"]["sha256"]},
            "members": members,
        }
        say(f"writing {out} (uncompressed tar): {len(members)} files, "
            f"{mib(sum(m['bytes'] for m in members.values()))}")
        write_archive(out, pack_manifest, files)
    say(f"packed {bundle.name} (release {rid}) with edgert {edgert_version} for {machine} / "
        f"CPython {version}{f' / {device}' if device else ''} into {out} in "
        f"{time.monotonic() - t0:.1f} s")
    say(f"on the board: edgert install {out.name}   (no edgert there yet: see "
        "`edgert install --help`)")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        return pack(args)
    except (PackError, DeployError, BundleError, OSError) as e:
        print(f"edgert pack: error: {e}", file=sys.stderr, flush=True)
        return 1


def register(sub) -> None:
    p = sub.add_parser(
        "pack", help="one archive with a bundle, edgert and its dependencies, for a board "
                     "without network (edgert install)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pack BUNDLE for an air-gapped board into one uncompressed tar (the\n"
                    "weights do not compress; a plain tar is checked member by member):\n"
                    "  wheels/   a wheel of this edgert and the wheels of its runtime\n"
                    "            dependencies for the board's platform (pip download\n"
                    "            --only-binary=:all:, manylinux glibc <= 2.28): run this where\n"
                    "            the package index is reachable\n"
                    "  bundle/   the bundle (verified here against its manifest first)\n"
                    "  PACK.json the size and sha256 of every member, what it was built for,\n"
                    "            the edgert version and the device profile\n"
                    "Written to a temporary file and renamed into place when complete.\n"
                    "On the board, `edgert install FILE.tar` checks it and starts it.",
        epilog="examples:\n"
               "  edgert pack bundles/smollm2-int4-trt -o smollm2-orin.tar --device "
               "orin-nano-8gb\n"
               "      (a Jetson profile: aarch64 and its JetPack's Python, 3.10)\n"
               "  edgert pack bundles/smollm2-int4 -o smollm2.tar --platform aarch64 "
               "--python-version 3.10\n"
               "  edgert pack bundles/smollm2-int4 -o smollm2.tar       (this machine's "
               "platform and Python)\n\n"
               "The board's Python (major.minor) and machine must be the ones packed for; "
               "`edgert install` refuses another.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE.tar",
                   help="the archive to write (replaced atomically if it exists)")
    p.add_argument("--device", metavar="PROFILE",
                   help="device profile (devices/*.json) recorded for edgert serve --device on "
                        "the board; a Jetson profile also sets --platform aarch64 and its "
                        "JetPack's --python-version")
    p.add_argument("--platform", choices=PLATFORMS,
                   help="the board's machine (default: this machine's, or aarch64 for a Jetson "
                        "--device)")
    p.add_argument("--python-version", metavar="3.N",
                   help="the board's Python (default: the --device profile's, else this one's, "
                        f"{sys.version_info[0]}.{sys.version_info[1]})")
    p.add_argument("--wheel", metavar="FILE", help="pack this edgert wheel instead of building "
                   "one from this checkout")
    p.set_defaults(func=_run)

