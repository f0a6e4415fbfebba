"""Which TensorRT engine (plan) serves a bundle on this board, and whether it may. Plans are
built on the board (`edgert build-engine`), one per device profile, TensorRT version and GPU,
stored as `engines/<profile>-trt<version>-sm<cc>.plan` inside the bundle with an entry in its
manifest (what it was built for: pool size, shape ranges, profiles). A plan serialised by
another TensorRT version or for another GPU does not load (TensorRT would refuse it, or worse),
so the runtime refuses it first, with a message that says how to rebuild.

Pure bookkeeping, no TensorRT import: the refusals and the profile shapes are tested on CPU
machines (tests/test_tensorrt_plan.py)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.bundle import MANIFEST, Bundle
from edgert.core.shapes import ShapeMenu

ENGINES = "engines"


class PlanError(RuntimeError):
    """No usable TensorRT plan for this bundle here; the message says what to do."""


def plan_name(device: str, trt_version: str, sm: str) -> str:
    """e.g. orin-nano-8gb-trt10.3.0-sm87.plan"""
    return f"{device}-trt{trt_version}-sm{sm.replace('.', '')}.plan"


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: min / opt / max dims per graph input."""

    name: str  # "decode" | "prefill"
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def covers(self, inputs: dict[str, tuple[int, ...]]) -> bool:
        return all(all(lo <= v <= hi for lo, v, hi in zip(self.shapes[n][0], dims,
                                                            self.shapes[n][2]))
                   for n, dims in inputs.items() if n in self.shapes)


def profiles(menu: ShapeMenu, io: dict[str, Any], num_blocks: int, kv_heads: int,
             head_dim: int) -> list[Profile]:
    """Two profiles over the shape menu (DESIGN.md: decode T = 1 and prefill chunks, sharing one
    activation memory); the pools fixed, min = opt = max, at the planned number of blocks."""
    names = io["inputs"]
    bs = menu.block_size
    pool = (num_blocks, kv_heads, bs, head_dim)
    out = []
    for kind, shapes in (("decode", [x for x in menu.all() if x[1] == 1]),
                         ("prefill", [x for x in menu.all() if x[1] > 1])):
        s_max = max(s for s, _, _ in shapes)
        t_lo, t_max = min(t for _, t, _ in shapes), max(t for _, t, _ in shapes)
        b_max = max(b for _, _, b in shapes)
        n_max = max(s * t for s, t, _ in shapes)
        s_opt, t_opt = min(s_max, 8), min(t_max, 64)
        b_opt = min(b_max, 16)
        dims = {
            names["input_ids"]: ((1, t_lo), (s_opt, t_opt if kind == "prefill" else 1),
                                 (s_max, t_max)),
            names["positions"]: ((1, t_lo), (s_opt, t_opt if kind == "prefill" else 1),
                                 (s_max, t_max)),
            names["query_lens"]: ((1,), (s_opt,), (s_max,)),
            names["context_lens"]: ((1,), (s_opt,), (s_max,)),
            names["block_tables"]: ((1, 1), (s_opt, b_opt), (s_max, b_max)),
            names["logits_indices"]: ((1,), (s_opt,), (n_max,)),
        }
        for pair in io["pools"]:
            for name in pair:
                dims[name] = (pool, pool, pool)
        out.append(Profile(kind, dims))
    return out


def profile_for(shape: tuple[int, int, int]) -> int:
    """Which profile a call of shape (S, T, B) runs under."""
    return 0 if shape[1] == 1 else 1


def entry_for(bundle: Bundle, device: str) -> dict[str, Any] | None:
    """The newest manifest entry for `device`, whatever version or GPU it was built for."""
    entries = [e for e in (bundle.manifest.get("engines") or {}).values()
               if e.get("device") == device]
    return max(entries, key=lambda e: e.get("built", "")) if entries else None


def check_plan(bundle: Bundle, device: str, trt_version: str, sm: str) -> dict[str, Any]:
    """The manifest entry of the plan that may serve `bundle` on this board, or PlanError."""
    rebuild = f"run `edgert build-engine {bundle.path} --device {device}` on this board"
    entry = (bundle.manifest.get("engines") or {}).get(plan_name(device, trt_version, sm))
    if entry is None:
        other = entry_for(bundle, device)
        if other is None:
            raise PlanError(f"{bundle.path} has no TensorRT engine for device {device!r}; "
                            f"{rebuild}")
        why = []
        if other.get("tensorrt") != trt_version:
            why.append(f"TensorRT {other.get('tensorrt')}, this board has {trt_version}")
        if str(other.get("sm")) != sm:
            why.append(f"a GPU of compute capability {other.get('sm')}, this one is {sm}")
        raise PlanError(f"the engine in {bundle.path} for {device!r} was built for "
                        f"{' and '.join(why) or 'another setup'}; a plan only loads on the "
                        f"TensorRT version and GPU that built it: {rebuild}")
    path = bundle.path / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise PlanError(f"{path}: missing or truncated (manifest says {entry['bytes']} "
                        f"bytes); {rebuild}")
    return entry


def record_plan(bundle: Bundle, entry: dict[str, Any]) -> None:
    """Add a plan's entry to the bundle's manifest, atomically (a crash mid-write leaves the
    old manifest). The file checksums of the bundle are untouched: plans are built here."""
    manifest = dict(bundle.manifest)
    engines = dict(manifest.get("engines") or {})
    engines[Path(entry["file"]).name] = entry
    manifest["engines"] = engines
    fd, tmp = tempfile.mkstemp(dir=bundle.path, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, bundle.path / MANIFEST)
