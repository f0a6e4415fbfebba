"""Tiny random checkpoints of architectures the native graph does not build, made INSIDE the
optimum exporter's venv (transformers 4.57): a checkpoint saved by the main venv's transformers
5.x may not load there (rope_parameters vs rope_theta), and the reference is transformers' own
forward either way. Run as a script: `python tests/optimum_tiny.py ARCH OUT_DIR [ARCH OUT_DIR
...]` (one torch import for them all); writes, per pair, the checkpoint, a word-level
tokenizer.json, and reference.npz (ids [n], logits [n, vocab]: one causal forward over the whole
sequence, so row i is what position i must produce after a prefill of any length and decodes up
to i).

Attention is kept far from uniform (large initializer_range, low rope_theta) and the KV geometry
off the defaults (GQA where the architecture has it, head_dim != hidden / heads where it allows
one, partial rotary where it has one), so a wrong position, mask or head shows in the logits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 96
SEQ = 44  # a 24-token prefill + 20 decode steps


def make(arch: str, out: Path, seed: int = 0) -> None:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "gpt_neox":  # MHA only; partial rotary (rotary_pct), parallel residual
        cfg = tf.GPTNeoXConfig(**common, rotary_pct=0.5, rotary_emb_base=30.0,
                               use_parallel_residual=True)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "phi3":  # GQA, fused qkv / gate_up projections
        cfg = tf.Phi3Config(**common, num_key_value_heads=2, rope_theta=30.0, pad_token_id=0)
        cls = tf.Phi3ForCausalLM
    elif arch == "stablelm":  # GQA, LayerNorm, partial rotary, qkv bias
        cfg = tf.StableLmConfig(**common, num_key_value_heads=2, rope_theta=30.0,
                                partial_rotary_factor=0.5, use_qkv_bias=True)
        cls = tf.StableLmForCausalLM
    elif arch == "gemma":  # optimum exports it without position_ids: the exporter refuses it
        cfg = tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=24, rope_theta=30.0,
                             hidden_activation="gelu_pytorch_tanh", pad_token_id=0)
        cls = tf.GemmaForCausalLM
    elif arch == "glm":  # GQA, head_dim 24, partial rotary (interleaved), fused gate_up
        cfg = tf.GlmConfig(**common, num_key_value_heads=2, head_dim=24, rope_theta=30.0,
                           partial_rotary_factor=0.5, pad_token_id=0)
        cls = tf.GlmForCausalLM
    else:
        raise SystemExit(f"unknown arch {arch}")
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    ids = np.random.default_rng(seed + 1).integers(3, VOCAB, SEQ)
    with torch.no_grad():
        logits = model(torch.tensor(ids[None])).logits[0].float().numpy()
    np.savez(out / "reference.npz", ids=ids, logits=logits)


if __name__ == "__main__":
    for arch, out in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
        make(arch, Path(out))
