"""Device profiles: one JSON file per target board, read by the fit plan (`edgert plan`, `serve
--device`) to size the KV pool and by the TensorRT engine builder to pick precisions and limits.
Shipped as package data so a board that installed only the runtime still has them. Every number
carries its source in the file's `sources`; one that could not be confirmed is listed in
`estimates` (devices/README.md says how each was found)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

KINDS = ("jetson", "dgpu", "cpu")


@dataclass(frozen=True)
class Software:
    """What the board's OS image ships (JetPack on a Jetson), None where it does not apply."""

    jetpack: str | None = None
    tensorrt: str | None = None  # e.g. "10.3"; None: no TensorRT for this target
    cuda: str | None = None
    python: str | None = None


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # "jetson" (CPU and GPU share memory), "dgpu" (a card with its own), or "cpu"
    # The memory the model, the pool and the activations live in: the unified DRAM of a Jetson,
    # the card's of a dGPU, the host's on a CPU target (None: this machine's, read at plan time).
    memory_bytes: int | None
    memory_shared: bool  # shared with the CPU, so the OS reserve comes out of it too
    memory_bandwidth_gbps: float | None  # peak, GB/s: decode is bound by it
    compute_capability: str | None  # e.g. "8.7" for Orin; None on CPU
    software: Software
    precisions: tuple[str, ...]  # what this target runs, best first
    # Left to the OS and its services (on a shared-memory board), and what a CUDA context with
    # cuBLAS/cuDNN takes once created; both are out of reach of the model and the pool.
    os_reserve_bytes: int
    cuda_context_bytes: int
    max_num_seqs: int
    max_model_len: int
    # TensorRT builder workspace limit: a build takes the weights, the pool and this at once,
    # and on an 8 GB Orin Nano an unbounded one can be OOM-killed. A chosen limit, not a
    # hardware fact (1 GiB on 8 GB boards, more where memory allows).
    trt_workspace_bytes: int = 1 << 30
    sources: dict[str, str] = field(default_factory=dict)  # field -> where the number is from
    estimates: tuple[str, ...] = ()  # fields whose numbers are not confirmed by a source

    @property
    def tensorrt(self) -> bool:
        """Whether edgert can build TensorRT engines here (TensorRT 10: strongly typed, INT4)."""
        v = self.software.tensorrt
        return v is not None and int(v.split(".")[0]) >= 10


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".json"))


def load(name: str) -> DeviceProfile:
    path = resources.files(__package__) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(names())}")
    d = json.loads(path.read_text())
    d["precisions"] = tuple(d["precisions"])
    d["estimates"] = tuple(d.get("estimates", ()))
    d["software"] = Software(**d.get("software", {}))
    profile = DeviceProfile(**d)
    if profile.kind not in KINDS:
        raise ValueError(f"{path}: kind {profile.kind!r} is not one of {KINDS}")
    return profile
