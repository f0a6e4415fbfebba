"""The loaders' common output: float weights under Hugging Face Llama names, plus what the bundle
needs from the source (tokenizer, chat template, special tokens, provenance). The graph builder
reads only this, so a new source format is one new loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.model_config import ModelConfig


@dataclass
class Checkpoint:
    config: ModelConfig
    # HF names, float32 numpy arrays; linear weights [out_features, in_features] as HF stores them:
    #   model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied),
    #   model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight,
    #   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k,v}_proj.bias (Qwen2),
    #   model.layers.{i}.self_attn.{q,k}_norm.weight (Qwen3),
    #   model.layers.{i}.mlp.{gate,up,down}_proj.weight
    weights: dict[str, np.ndarray]
    tokenizer_json: str  # a `tokenizers` tokenizer.json
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)  # source kind, path, sha256, ...

    def weight(self, name: str) -> np.ndarray:
        try:
            return self.weights[name]
        except KeyError:
            raise KeyError(f"checkpoint has no tensor {name!r}") from None

    def lm_head(self) -> np.ndarray:
        """[vocab, hidden]; the embedding itself when tied."""
        if self.config.tie_word_embeddings:
            return self.weights["model.embed_tokens.weight"]
        return self.weight("lm_head.weight")
