"""The architecture description shared by the exporter (which writes it) and the runtime (which
reads it from the manifest). Only what the graph and the KV pool need; nothing tokenizer-side."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    rope_scaling: dict[str, Any] | None = field(default=None)
    # Beyond the Llama family (every default is Llama's, so older manifests read unchanged):
    hidden_act: str = "silu"  # the MLP gate's activation: "silu" or "gelu_tanh" (Gemma 2)
    rotary_dim: int | None = None  # Phi-3's partial_rotary_factor: RoPE on the first dims only
    embedding_multiplier: float = 1.0  # Gemma 2 scales the embeddings by sqrt(hidden)
    sandwich_norms: bool = False  # Gemma 2: a norm on the attention's and the MLP's outputs too
    attention_scale: float | None = None  # softmax(q.k * scale); None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits
    sliding_window: int | None = None  # a query at p sees keys in (p - window, p] ...
    sliding_window_layers: tuple[int, ...] = ()  # ... in these layers; the others see all

    def __post_init__(self) -> None:
        # a manifest's JSON list comes back as a tuple, so configs stay hashable and equal
        object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))

    @property
    def rope_dims(self) -> int:
        """How many of each head's dims RoPE rotates (all but for a partial rotary factor)."""
        return self.rotary_dim or self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token occupies in the KV pool across all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)
