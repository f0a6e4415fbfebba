"""The device pool's CUDA kernels (edgert/runner/device_pool.py) compile for the GPUs our users
have, checked with nvcc where the machine has it (this repository's machines do, without a GPU):
a syntax or type error in them would otherwise first show on a board. They are RUN only on a GPU
(tests/test_backend_contract.py through scripts/gpu_check.sh)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edgert.runner.device_pool import _KERNELS


@pytest.mark.parametrize("arch", ["sm_72", "sm_75", "sm_87"])  # Xavier, T4, Orin
def test_kernels_compile(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    src = tmp_path / "kv.cu"
    src.write_text(_KERNELS)
    proc = subprocess.run([nvcc, "--cubin", f"-arch={arch}", "-o", str(tmp_path / "kv.cubin"),
                           str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "Unsupported gpu architecture" in proc.stderr:
        pytest.skip(f"this nvcc does not target {arch}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "kv.cubin").stat().st_size > 0
