"""The private Python environment the optimum exporter runs in.

optimum-onnx 0.1.0 pins optimum ~= 2.1 and transformers < 4.58, while edgert's host tools and
tests use transformers 5.x: one interpreter cannot hold both. So the optimum path never imports
optimum here; it builds (once) a venv of its own under the edgert cache and runs the exporter
there as a subprocess. The requirements are pinned in one constant and hashed into a marker
file, so a second call is free and a changed pin rebuilds the venv instead of running a stale
one. torch is pinned to the CPU build the main venv uses (an unpinned `torch` may resolve to a
multi-gigabyte CUDA wheel).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from export.pull import default_cache_dir

REQUIREMENTS: tuple[str, ...] = (
    "optimum-onnx==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",  # optimum-onnx 0.1.0: transformers >= 4.36, < 4.58
    "torch==2.13.0",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",  # optimum's exporter validates its graph with it
    "accelerate==1.15.0",  # without it optimum keeps a tied LM head twice (SmolLM2: +113 MB)
)
MARKER = ".edgert-requirements"


class OptimumEnvError(RuntimeError):
    """The optimum venv could not be created or used; the message says which step failed."""


def requirements_hash(requirements: tuple[str, ...] = REQUIREMENTS) -> str:
    text = "\n".join(sorted(requirements)) + f"\npython {sys.version_info[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def env_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir if cache_dir is not None else default_cache_dir()) / "envs" / "optimum"


def env_python(path: Path) -> Path:
    return path / "bin" / "python"


def ensure_optimum_env(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """The venv's python, creating the venv first unless its marker matches REQUIREMENTS.

    Built beside the target and renamed into place, so an interrupted build is never taken for a
    finished one. pip's own output (download progress) goes to the terminal unless `quiet`."""
    target = env_dir(cache_dir)
    want = requirements_hash()
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == want and env_python(target).exists():
        return env_python(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"creating the optimum exporter venv in {target} (once; {len(REQUIREMENTS)} pinned "
          "requirements)", file=sys.stderr, flush=True)
    try:
        venv.EnvBuilder(with_pip=True, symlinks=True).create(tmp)
        cmd = [str(env_python(tmp)), "-m", "pip", "install", "--disable-pip-version-check",
               *(["-q"] if quiet else []), *REQUIREMENTS]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None,
                              stderr=subprocess.PIPE if quiet else None, text=True)
        if done.returncode != 0:
            tail = (done.stderr or "")[-2000:]
            raise OptimumEnvError(
                f"pip could not install the optimum exporter's requirements "
                f"({' '.join(REQUIREMENTS)}) into {tmp}: exit {done.returncode}\n{tail}")
        (tmp / MARKER).write_text(want + "\n")
        # Console scripts' shebangs name the build directory; only `python -m` is ever used.
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return env_python(target)


def run_in_env(python: Path, args: list[str], *, quiet: bool = False,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python args...` in the optimum venv with a clean environment (no PYTHONPATH of the
    caller's, so the main venv's transformers can never leak in)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                              "VIRTUAL_ENV")}
    env.setdefault("HF_HUB_OFFLINE", "1")  # only local directories; there is no model hub
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return subprocess.run([str(python), *args], env=env, text=True, timeout=timeout,
                          capture_output=quiet)
