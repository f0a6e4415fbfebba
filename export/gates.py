"""How much a quantized bundle may lose before `edgert export` refuses it: the allowed rise of
perplexity on held-out text, relative to the fp32 graph of the same source. Measured on
SmolLM2-135M (README, "Quantization"); the gate of a bundle is recorded in its manifest so that
`edgert eval` on a board can say how it stands against it."""

from __future__ import annotations

# Keyed by (precision, flavour, symmetric); a bundle takes its coarsest weights' (QuantConfig.gate).
QUALITY_GATES: dict[tuple[str, str, bool], float] = {
    ("fp16", "portable", True): 0.005,
    ("fp16", "cpu", True): 0.005,
    ("int8", "cpu", True): 0.01,
    ("int8", "portable", True): 0.03,
    ("int4", "cpu", False): 0.05,
    ("int4", "cpu", True): 0.15,
    ("int4", "portable", True): 0.15,
}


def quality_gate(precision: str, flavour: str, symmetric: bool) -> float | None:
    """Allowed relative perplexity rise for a configuration; None when there is none (fp32)."""
    if precision == "fp32":
        return None
    return QUALITY_GATES.get((precision, flavour, symmetric))
