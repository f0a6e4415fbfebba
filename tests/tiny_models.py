"""Tiny random Hugging Face checkpoints made by transformers inside the tests: attention far from
uniform (large initializer_range, low rope_theta), fewer KV heads than query heads, and for Qwen3
a head_dim that is not hidden / heads. The reference is pinned to float32."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 128


def word_level_tokenizer() -> Tokenizer:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def make_tiny(arch: str, path: Path, seed: int = 0, tie: bool = False):
    """Create, save and return (model, path) for arch in llama / llama-mha (no GQA) / qwen2 /
    qwen3 / mistral-swa (a 12-token window) / phi3 / phi3-partial (partial rotary, LongRoPE, a
    12-token window) / gemma2 (a 12-token window on alternate layers, both soft-caps)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama-mha":
        arch, common["num_key_value_heads"] = "llama", 4
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=30.0)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=30.0, use_sliding_window=False)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=24, rope_theta=30.0, use_sliding_window=False)
        cls = tf.Qwen3ForCausalLM
    elif arch == "mistral-swa":  # a window shorter than the tests' contexts, on every layer
        arch = "mistral"
        cfg = tf.MistralConfig(**common, rope_theta=30.0, sliding_window=12)
        cls = tf.MistralForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common, rope_theta=30.0, sliding_window=None)
        cls = tf.Phi3ForCausalLM
    elif arch == "phi3-partial":
        arch = "phi3"
        head_dim = common["hidden_size"] // common["num_attention_heads"]
        rot = head_dim // 2  # partial_rotary_factor 0.5: RoPE on 8 of 16 dims
        factors = dict(short_factor=[1.0 + 0.25 * i for i in range(rot // 2)],
                       long_factor=[2.0 + i for i in range(rot // 2)])
        cfg = tf.Phi3Config(**{**common, "max_position_embeddings": 1024},
                            original_max_position_embeddings=256, sliding_window=12,
                            rope_parameters=dict(rope_type="longrope", rope_theta=30.0,
                                                 partial_rotary_factor=0.5, **factors))
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=24,
                              rope_theta=30.0, query_pre_attn_scalar=20, sliding_window=12,
                              attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                              hidden_activation="gelu_pytorch_tanh",
                              attn_implementation="eager")
        cls = tf.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "gemma2":  # norms init to zero weight (a scale of 1): make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0, 0.3)
    if arch == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    word_level_tokenizer().save(str(path / "tokenizer.json"))
    return model, path


def reference_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
