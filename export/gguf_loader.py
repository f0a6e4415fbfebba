"""Load a GGUF file (llama.cpp's format) into a `Checkpoint`: dequantized float32 weights under
Hugging Face names, a ModelConfig from the metadata, and a `tokenizers` tokenizer.json rebuilt
from the tokenizer.ggml.* metadata (a GGUF carries no tokenizer.json).

Two conversions of llama.cpp's converter have to be undone, or the model loads but computes
nonsense: it permutes the rows of Q and K of "llama"-architecture models into its own RoPE layout
(Qwen2/Qwen3 files are not permuted), and it stores the vocabulary as plain lists, losing the
pre-tokenizer, which we map back from `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre
from tqdm import tqdm

from edgert.model_config import ModelConfig
from export.checkpoint import Checkpoint
from export.hf_loader import UnsupportedModelError, check_weights, rope_scaling_config
from export.pull import sha256_file

# GGUF general.architecture -> ModelConfig.architecture. llama.cpp writes Mistral 7B as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_ARCHS = ("llama",)

_TENSOR_NAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"token_embd\.weight", "model.embed_tokens.weight"),
        (r"output_norm\.weight", "model.norm.weight"),
        (r"output\.weight", "lm_head.weight"),
        (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
        (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"blk\.(\d+)\.attn_([qk])_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
        (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    ]
]
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style frequency factors, checked then dropped

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the pre-tokenizer (and normalizer) of the model's original tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> pre.PreTokenizer:
    return pre.Sequence(
        [
            pre.Split(Regex(regex), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS: dict[str, Callable[[], tuple[pre.PreTokenizer, normalizers.Normalizer | None]]] = {
    "gpt-2": lambda: (pre.ByteLevel(add_prefix_space=False, use_regex=True), None),
    # SmolLM2 / SmolLM's tokenizer.json: every digit its own pre-token, then GPT-2's byte level.
    "smollm": lambda: (
        pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
        None,
    ),
    "llama-bpe": lambda: (_split_then_bytes(_LLAMA3_SPLIT), None),
    "llama3": lambda: (_split_then_bytes(_LLAMA3_SPLIT), None),
    "qwen2": lambda: (_split_then_bytes(_QWEN2_SPLIT), normalizers.NFC()),
    "deepseek-r1-qwen": lambda: (_split_then_bytes(_QWEN2_SPLIT), normalizers.NFC()),
}


def load_gguf(path: Path, progress: bool = True) -> Checkpoint:
    """Dequantize every tensor to float32 (the graph builder re-quantizes to its own formats)."""
    path = Path(path)
    reader = GGUFReader(path)
    meta = _Metadata(reader, str(path))
    gguf_arch = meta.get("general.architecture")
    if gguf_arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {gguf_arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _model_config(meta, gguf_arch, tensors, str(path))

    weights: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", disable=not progress):
        if t.name == _ROPE_FREQS:
            continue
        hf_name = _hf_name(t.name)
        if hf_name is None:
            raise UnsupportedModelError(f"{path}: tensor {t.name!r} is not one the graph uses")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest axis first
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            kind = GGMLQuantizationType(t.tensor_type).name
            raise UnsupportedModelError(
                f"{path}: tensor {t.name!r} is {kind}, which this gguf package version cannot "
                "dequantize; upgrade gguf or re-quantize the file"
            ) from None
        if gguf_arch in _PERMUTED_ARCHS:
            if ".self_attn.q_proj." in hf_name:
                w = _unpermute(w, config.num_heads)
            elif ".self_attn.k_proj." in hf_name:
                w = _unpermute(w, config.num_kv_heads)
        weights[hf_name] = w
    check_weights(config, weights, str(path))

    tokenizer_json, add_bos = _tokenizer(meta, str(path))
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    # Chat models end a turn with EOT/EOM (e.g. Llama 3's <|eot_id|>) rather than EOS.
    eos = [
        int(v)
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (v := meta.get(f"tokenizer.ggml.{key}", None)) is not None
    ]
    file_type = meta.get("general.file_type", None)
    provenance = {
        "kind": "gguf",
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "name": meta.get("general.name", None),
        "architecture": gguf_arch,
        "file_type": _enum_name(LlamaFileType, file_type),
        "tensor_types": dict(
            Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
        ),
    }
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        chat_template=meta.get("tokenizer.chat_template", None),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos)),
        add_bos_token=add_bos,
        provenance=provenance,
    )


class _Metadata:
    """Typed access to the key/value section, with errors that name the missing key."""

    _MISSING = object()

    def __init__(self, reader: GGUFReader, source: str) -> None:
        self._fields = reader.fields
        self._source = source

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise UnsupportedModelError(f"{self._source}: GGUF metadata has no {key!r}")
            return default
        return field.contents()


def _model_config(meta: _Metadata, arch: str, tensors: dict[str, Any], source: str) -> ModelConfig:
    def key(name: str, default: Any = _Metadata._MISSING) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{source}: partial rotary embeddings (rope dims {rope_dim} of {head_dim}) unsupported"
        )
    context = int(key("context_length"))
    window = key("attention.sliding_window", None)
    if window is not None and int(window) < context:
        raise UnsupportedModelError(
            f"{source}: sliding-window attention (window {window} < context {context}) "
            "is not supported yet"
        )
    theta = float(key("rope.freq_base", 10000.0))
    rope_type = key("rope.scaling.type", None)
    rope_params: dict[str, Any] = {"factor": key("rope.scaling.factor", None)}
    if _ROPE_FREQS in tensors:
        if rope_type not in (None, "none"):
            raise UnsupportedModelError(f"{source}: rope_freqs together with {rope_type!r} scaling")
        rope_type = "llama3"
        rope_params = _llama3_params(
            np.asarray(tensors[_ROPE_FREQS].data, dtype=np.float64),
            head_dim,
            theta,
            key("rope.scaling.original_context_length", None),
            source,
        )
    n_layers = int(key("block_count"))
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        rope_scaling=rope_scaling_config(rope_type, rope_params),
    )


def _llama3_params(
    factors: np.ndarray, head_dim: int, theta: float, orig_ctx: Any, source: str
) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1's RoPE scaling only as per-frequency factors. Every Llama 3.x
    release uses low_freq_factor 1 and high_freq_factor 4, and the largest factor is `factor`;
    accept those parameters only if they reproduce the stored factors exactly."""
    params: dict[str, Any] = {
        "factor": round(float(factors.max()), 4),  # stored as float32: 8.000000953674316
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(orig_ctx) if orig_ctx else 8192,
    }
    old_ctx = params["original_max_position_embeddings"]
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    expected = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / params["high_freq_factor"]:
            expected.append(1.0)
        elif wavelen > old_ctx / params["low_freq_factor"]:
            expected.append(params["factor"])
        else:
            smooth = (old_ctx / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / params["factor"] + smooth))
    if factors.shape != (head_dim // 2,) or not np.allclose(factors, expected, rtol=1e-4):
        raise UnsupportedModelError(
            f"{source}: rope_freqs does not match Llama 3 RoPE scaling; unsupported RoPE variant"
        )
    return params


def _hf_name(gguf_name: str) -> str | None:
    for pattern, replacement in _TENSOR_NAMES:
        if pattern.fullmatch(gguf_name):
            return pattern.sub(replacement, gguf_name)
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)`, which
    interleaves the two rotary halves of each head; works for weights [out, in] and biases [out]."""
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    )


def _enum_name(enum: Any, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(enum(int(value)).name)
    except ValueError:
        return str(value)


# --- tokenizer ----------------------------------------------------------------------------------


def _tokenizer(meta: _Metadata, source: str) -> tuple[str, bool]:
    """(tokenizer.json, add_bos_token). The post-processor adds BOS itself when the model wants
    it, as the HF tokenizer.json of such models does, so the file is usable on its own."""
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, types, source)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types)
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise UnsupportedModelError(
            f"{source}: GGUF tokenizer model {model!r} is not supported (supported: gpt2, llama)"
        )
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    if add_bos and bos is not None:
        bos_tok = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B",
            special_tokens=[(bos_tok, int(bos))],
        )  # fmt: skip
    # Control tokens (<|im_start|>, <s>) must encode as one id, never as their characters.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    return tok.to_str(), add_bos


def _byte_level_bpe(
    meta: _Metadata, tokens: Sequence[str], types: Sequence[int], source: str
) -> Tokenizer:
    pre_name = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre_name not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{source}: GGUF pre-tokenizer {pre_name!r} is not supported "
            f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
        if k not in (_CONTROL, _USER_DEFINED) and not set(t) <= spelled:
            # Some converters store a normal token as raw text instead of in the byte alphabet.
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre_tokenizer, normalizer = _PRE_TOKENIZERS[pre_name]()
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (`bytes_to_unicode`): printable Latin-1
    bytes stand for themselves, the others are shifted past 255. Fixed by the format."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in out)
    for n, b in enumerate(shifted):
        out[b] = chr(256 + n)
    return out


def _sentencepiece_bpe(meta: _Metadata, tokens: Sequence[str], types: Sequence[int]) -> Tokenizer:
    """SentencePiece BPE as transformers' GGUF converter rebuilds it: byte fallback for unknown
    characters, merges recovered from the scores (a GGUF stores none for this model type)."""
    scores: list[float] = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    unk = meta.get("tokenizer.ggml.unknown_token_id", None)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, dict(zip(tokens, scores, strict=True))),
            unk_token=None if unk is None else tokens[int(unk)],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps: list[decoders.Decoder] = [
        decoders.Replace("\u2581", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces is a merge, ranked by the merged token's
    score (higher merges first), as SentencePiece's BPE applies them."""
    found: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]
