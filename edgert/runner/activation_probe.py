"""A bundle's memory on ONNX Runtime's CPU provider, measured rather than guessed: a fresh
process loads the session (what that adds to its RSS is the weights as ORT holds them, prepacked
copies included), then runs the menu's most expensive calls; how far its peak RSS (VmHWM) rose
over the RSS before the first call is what the activations took (ORT's arena keeps what its
largest call needed). A fresh process, so the caller's own history cannot hide the peak."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from edgert.core.shapes import Shape


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def measure(bundle_path: str, shapes: list[Shape], num_blocks: int, block_size: int,
            threads: int = 0, timeout: float = 600) -> dict[str, int]:
    """{"weights": RSS the loaded session added, "activations": what `shapes` added on top}.
    The pool is left untouched (the calls read only the null block and write nothing), so it
    is not counted."""
    arg = json.dumps({"bundle": str(bundle_path), "shapes": shapes, "num_blocks": num_blocks,
                      "block_size": block_size, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "edgert.runner.activation_probe", arg],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring activations failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(arg: str) -> None:
    from edgert.bundle import PAGED, Bundle
    from edgert.config import BackendConfig
    from edgert.runner.dense_backend import DenseBackend
    from edgert.runner.ort_backend import OrtBackend
    from edgert.runner.step_inputs import dummy_inputs

    a = json.loads(arg)
    bundle = Bundle.load(a["bundle"], verify=False)
    start = _status("VmRSS")
    cls = OrtBackend if bundle.convention == PAGED else DenseBackend
    backend = cls(bundle, a["num_blocks"], a["block_size"], BackendConfig(threads=a["threads"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: loading the session peaks higher than it stays
    before = _status("VmRSS")
    for shape in a["shapes"]:
        s, t, _ = shape
        backend.run(dummy_inputs(tuple(shape)), np.full((s, t), -1, np.int64))
    print(json.dumps({"weights": before - start,
                      "activations": max(_status("VmHWM") - before, 0)}))


if __name__ == "__main__":
    _main(sys.argv[1])
