"""Choosing tokens from logits: the vectorised sampler and logprobs."""
