"""Text in and out: tokenizer and chat template, incremental detokenizer, stop strings, and the
per-choice stream that turns sampled tokens into text deltas."""
