"""The fit plan of a bundle on a device profile, with its activations filled in: measured on ONNX
Runtime's CPU provider when the target is a CPU host (a probe process runs the menu's largest
calls), estimated from the shapes for a GPU target (TensorRT's own figure exists only after a
build on the board, and the estimate must not vary between `build-engine` and `serve`, which
must agree on the pool the plan was built for)."""

from __future__ import annotations

import logging
import math
import platform

import devices
from edgert.bundle import Bundle
from edgert.config import EngineConfig, mem_available
from edgert.core.fit_plan import (
    DTYPE_BYTES,
    FitPlan,
    Line,
    estimate_activations,
    largest_shapes,
    plan_fit,
)
from edgert.core.shapes import ShapeMenu
from edgert.runner.kv_pool import KVPool

log = logging.getLogger(__name__)


def host_profile() -> str:
    """The generic CPU profile of this machine's architecture."""
    return "cpu-aarch64" if platform.machine() in ("aarch64", "arm64") else "cpu-x86-64"


def menu_for(bundle: Bundle, config: EngineConfig, num_blocks: int, block_size: int
             ) -> ShapeMenu:
    sched = config.scheduler(bundle.config.max_position_embeddings)
    usable = num_blocks - 1
    return ShapeMenu(
        max_num_seqs=sched.max_num_seqs, token_budget=sched.max_num_batched_tokens,
        max_blocks=min(-(-sched.max_model_len // block_size), usable), pool_blocks=usable,
        block_size=block_size, split_decode=sched.max_decode_calls > 1)


def plan_for_device(bundle: Bundle, config: EngineConfig, device: str, *,
                    context: int | None = None, concurrency: int | None = None,
                    measure: bool = True) -> FitPlan:
    """`config.kv_memory` None: size the pool from what is left (`config.kv_fraction` of it);
    else check that pool. `measure=False` estimates CPU activations too (quick, for tests)."""
    profile = devices.load(device)
    cfg = bundle.config
    block_size = config.block_size or int(bundle.kv["block_size"])
    kv_dtype = str(bundle.kv["dtype"])
    sched = config.scheduler(cfg.max_position_embeddings)
    context = min(context or sched.max_model_len, cfg.max_position_embeddings)
    concurrency = concurrency or sched.max_num_seqs
    memory = None if profile.memory_bytes is not None else mem_available()
    act_bytes = DTYPE_BYTES.get(bundle.graph.get("activation_dtype", "float32"), 4)

    def fit(activations: Line, weights: int = bundle.weights_bytes()) -> FitPlan:
        return plan_fit(profile, cfg, precision=str(bundle.manifest.get("precision", "fp32")),
                        weights_bytes=weights, kv_dtype=kv_dtype,
                        block_size=block_size, activations=activations, context=context,
                        concurrency=concurrency, memory_bytes=memory,
                        kv_request=config.kv_memory, fraction=config.kv_fraction)

    # The shapes depend on the pool and the pool on the activations: plan with the pool the
    # request needs (no activations yet), take that menu's largest calls, then plan for real.
    first = fit(Line("activations", 0, "estimate"))
    wanted = 1 + concurrency * math.ceil(context / block_size)
    blocks = max(min(first.num_blocks or wanted, wanted), 2)
    shapes = largest_shapes(menu_for(bundle, config, blocks, block_size))
    if profile.kind == "cpu" and measure:
        from edgert.runner.activation_probe import measure as probe

        got = probe(str(bundle.path), shapes, blocks, block_size, config.backend.threads)
        return fit(Line("activations", got["activations"],
                        f"measured (ORT CPU, the {len(shapes)} largest calls)"),
                   max(got["weights"], bundle.weights_bytes()))
    what = "TensorRT" if profile.kind != "cpu" else "ORT CPU"
    return fit(Line("activations", estimate_activations(cfg, shapes, block_size, act_bytes),
                    f"estimate for {what} (the largest call's tensors)"))


def pool_blocks(bundle: Bundle, config: EngineConfig) -> int:
    """The pool the engine allocates, in blocks (null block included): `config.kv_memory`
    bytes, or with None the device plan's pool, refused with its report when it does not fit."""
    block_size = config.block_size or int(bundle.kv["block_size"])
    cfg = bundle.config
    if config.kv_memory is not None and config.backend.device_profile is None:
        return KVPool.num_blocks_for_budget(config.kv_memory, cfg.num_layers, cfg.num_kv_heads,
                                            cfg.head_dim, block_size, bundle.kv["dtype"])
    from edgert.core.fit_plan import FITS, render

    device = config.backend.device_profile or host_profile()
    plan = plan_for_device(bundle, config, device,
                           measure=config.backend.provider == "cpu")
    shrunk = config.kv_memory is not None and plan.pool_bytes < config.kv_memory
    if plan.num_blocks < 2 or shrunk:
        raise ValueError(f"the bundle does not fit as asked (refused before allocating, rather "
                         f"than killed for memory later):\n{render(plan)}")
    if plan.verdict != FITS:
        log.warning("%s", render(plan))
    return plan.num_blocks
