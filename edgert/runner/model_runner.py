"""A step's plan -> graph calls on the backend -> each row's logits. The one place the engine's
plan meets a backend, so a new backend (CUDA, TensorRT) drops in behind `Backend` without the
engine or the scheduler changing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from edgert.core.plan import StepPlan
from edgert.core.shapes import Shape
from edgert.runner.step_inputs import StepInputs, build_step, dummy_inputs


class Backend(Protocol):
    """Runs the graph and owns the KV pool it computes on: applies the copy-on-write block
    copies, runs the call, writes the returned new K/V into its pool at `slot_mapping`, and
    returns only the logits, on the host."""

    def run(self, x: StepInputs, slot_mapping: np.ndarray,
            cow_copies: Sequence[tuple[int, int]] = ()) -> np.ndarray: ...


class ModelRunner:
    def __init__(self, backend: Backend, block_size: int):
        self.backend = backend
        self.block_size = block_size
        self.warmed: set[Shape] = set()  # every shape warm-up ran
        self.seen: set[Shape] = set()  # every shape a step has run

    def execute(self, plan: StepPlan) -> list[list[np.ndarray]]:
        """Per call of the plan, per row: the logits [len(row.logits), vocab] it asked for."""
        out = []
        cow = plan.cow_copies
        for call in plan.calls:
            step = build_step(call, self.block_size)
            self.seen.add(step.inputs.shape)
            logits = self.backend.run(step.inputs, step.slot_mapping, cow)
            cow = []  # applied before the first call
            out.append([logits[r] for r in step.logit_rows])
        return out

    def lone_row_differs(self) -> bool:
        """Whether a one-row decode call gives its row other logits than a two-row call gives
        the same row. Some CPU kernels take a one-row path that sums in another order (ORT
        1.32's 4-bit MatMulNBits on AVX2 without VNNI: ~1e-6, which its int8 activations turn
        into another answer); where this holds, a lone decoding row takes a padding token."""
        one, two = (self.backend.run(dummy_inputs((s, 1, 1)), np.full((s, 1), -1, np.int64))
                    for s in (1, 2))
        return not np.array_equal(one[0], two[0])

    def warmup(self, shapes: Iterable[Shape]) -> int:
        """Run each shape once on the null block, in the given order (largest first lets
        ORT's arena reach its peak at once)."""
        n = 0
        for shape in shapes:
            x = dummy_inputs(shape)
            self.backend.run(x, np.full(shape[:2], -1, np.int64))
            self.warmed.add(shape)
            n += 1
        return n
