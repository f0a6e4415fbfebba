"""The English text the exporter calibrates on: Python's own documentation (`pydoc_data.topics`,
in every CPython), minus the quarter of its topics that `edgert eval` scores, so no bundle is
scored on text it was calibrated on.

The split is stated in both halves on purpose: the runtime (edgert/tools/evaluate.py) may never
import the exporter, and the exporter owns its own inputs. tests/test_eval.py holds the two to
the same split: disjoint, and together every topic."""

from __future__ import annotations

# Topic i of the sorted pydoc topics is scored by `edgert eval` iff i % 4 == 1 (a quarter of
# the text, ~34k SmolLM2 tokens, spread over the alphabet): calibration takes every other one.
EVAL_EVERY = 4
EVAL_SLOT = 1


def calibration_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for i, k in enumerate(sorted(topics)) if i % EVAL_EVERY != EVAL_SLOT]


def calibration_text() -> str:
    """The built-in calibration text (`--calib builtin`)."""
    return "\n\n".join(calibration_topics())
