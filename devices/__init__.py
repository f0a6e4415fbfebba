"""Device profiles: one JSON file per target board, read by the runtime to size the KV pool and
by the TensorRT engine builder to pick precisions and limits. Shipped as package data so a board
that installed only the runtime still has them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # "jetson" (unified CPU/GPU memory), "dgpu", or "cpu"
    memory_bytes: int  # total memory the model + pool share (unified on Jetson)
    reserved_bytes: int  # left to the OS, CUDA context, the server and the tokenizer
    compute_capability: str | None  # e.g. "8.7" for Orin; None on CPU
    precisions: tuple[str, ...]  # what this target runs well, best first
    tensorrt: bool
    max_num_seqs: int
    max_model_len: int
    # TensorRT builder workspace limit: a build takes the weights, the pool and this at once,
    # and on an 8 GB Orin Nano an unbounded one can be OOM-killed. A chosen limit, not a
    # hardware fact (1 GiB on 8 GB boards, more where memory allows).
    trt_workspace_bytes: int = 1 << 30

    def kv_budget(self, weights_bytes: int, fraction: float = 0.9) -> int:
        """Bytes for the KV pool: a fraction of what is left after weights and the reserve."""
        free = self.memory_bytes - self.reserved_bytes - weights_bytes
        if free <= 0:
            raise ValueError(f"{self.name}: weights ({weights_bytes >> 20} MiB) do not fit in "
                             f"{(self.memory_bytes - self.reserved_bytes) >> 20} MiB")
        return int(free * fraction)


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".json"))


def load(name: str) -> DeviceProfile:
    path = resources.files(__package__) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(names())}")
    d = json.loads(path.read_text())
    d["precisions"] = tuple(d["precisions"])
    return DeviceProfile(**d)
