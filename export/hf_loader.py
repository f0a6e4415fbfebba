"""Load a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json) into a
`Checkpoint`.

Everything is read without torch or transformers (safetensors' numpy view, plain json), because
the export extra must not need them. Anything the graph would silently compute wrongly (sliding
windows, unknown RoPE scalings, extra biases, quantized checkpoints) is refused up front with a
message that names the feature, instead of producing a bundle that generates garbage.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (importing it teaches numpy, and so safetensors, "bfloat16")
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from edgert.model_config import ModelConfig
from export.checkpoint import Checkpoint
from export.pull import sha256_file


class UnsupportedModelError(ValueError):
    """The checkpoint uses something the graph builder does not implement (yet)."""


# HF architecture class -> ModelConfig.architecture
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# In checkpoints but not in the graph: RoPE frequencies are recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --- helpers shared with the GGUF loader -----------------------------------------------------


def rope_scaling_config(rope_type: str | None, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Normalise a RoPE scaling to the HF `rope_parameters` spelling the graph builder reads:
    None for plain RoPE, else {"rope_type": ..., <that type's parameters as floats/ints>}."""
    if rope_type in (None, "default", "none"):
        return None
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(_required(params, "factor", rope_type))}
    if rope_type == "llama3":
        out: dict[str, Any] = {"rope_type": "llama3"}
        for key in _LLAMA3_KEYS:
            value = _required(params, key, rope_type)
            out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
        return out
    raise UnsupportedModelError(
        f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    )


def _required(params: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if params.get(key) is None:
        raise UnsupportedModelError(f"RoPE scaling {rope_type!r} is missing its parameter {key!r}")
    return params[key]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads, with its HF shape: the contract a loader must fulfil."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        }
        if config.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], source: str) -> None:
    """Fail at load time, naming the tensor, rather than deep inside graph building."""
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            raise KeyError(f"{source}: missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise UnsupportedModelError(
                f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"the config implies {shape}"
            )


# --- the HF loader ------------------------------------------------------------------------------


def load_hf_checkpoint(path: Path) -> Checkpoint:
    """Load a HF model directory; see the module docstring for what is refused and why."""
    path = Path(path)
    cfg = _read_json(path / "config.json", required=True)
    config = hf_model_config(cfg, source=str(path))

    files = _safetensors_files(path)
    weights = _load_weights(files, config, source=str(path))

    tokenizer_json = _read_text(path / "tokenizer.json")
    if tokenizer_json is None:
        raise UnsupportedModelError(
            f"{path} has no tokenizer.json; only fast (`tokenizers`) tokenizers are supported "
            "(save one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained)"
        )
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tok_cfg = _read_json(path / "tokenizer_config.json")
    gen_cfg = _read_json(path / "generation_config.json")

    bos_id = _first_id(cfg.get("bos_token_id"), gen_cfg.get("bos_token_id"))
    if bos_id is None:
        bos_id = _token_id(tokenizer, tok_cfg.get("bos_token"))
    eos_ids = _unique(
        [
            *_ids(gen_cfg.get("eos_token_id")),
            *_ids(cfg.get("eos_token_id")),
            *_ids(_token_id(tokenizer, tok_cfg.get("eos_token"))),
        ]
    )
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        # Tokenizers like Llama 3's say nothing and add BOS in tokenizer.json's post-processor.
        add_bos = bos_id is not None and tokenizer.encode("a").ids[:1] == [bos_id]

    read = [path / "config.json", *files]
    read += [p for p in (path / "tokenizer.json", path / "tokenizer_config.json") if p.is_file()]
    provenance = {
        "kind": "hf",
        "path": str(path.resolve()),
        "architectures": cfg.get("architectures"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "files": {p.name: sha256_file(p) for p in read},
    }
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        chat_template=_chat_template(path, tok_cfg),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos_token=bool(add_bos),
        provenance=provenance,
    )


def hf_model_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict, refusing what the graph cannot run."""
    archs = cfg.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: architectures {archs} not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(
            f"{source}: pre-quantized checkpoints ({method}) are not supported; use the float one"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {cfg['hidden_act']!r} is not silu")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: MLP biases (mlp_bias) are not supported")
    if arch in ("llama", "mistral", "qwen3") and cfg.get("attention_bias"):
        # Unlike Qwen2's q/k/v-only bias, these add a bias to o_proj too, which the graph lacks.
        raise UnsupportedModelError(f"{source}: attention_bias on {arch} is not supported")

    try:
        return _model_config(cfg, arch, source)
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: config.json lacks {e.args[0]!r}") from None


def _model_config(cfg: Mapping[str, Any], arch: str, source: str) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    max_pos = int(cfg["max_position_embeddings"])
    _refuse_sliding_window(cfg, arch, max_pos, source)

    theta, rope_type, rope_params = _rope(cfg, source)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        # Absent only in hand-written configs; every architecture here defaults to untied.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        rope_scaling=rope_scaling_config(rope_type, rope_params),
    )


def _refuse_sliding_window(cfg: Mapping[str, Any], arch: str, max_pos: int, source: str) -> None:
    """The graph attends to the whole past; a window shorter than the context changes outputs."""
    layer_types = cfg.get("layer_types") or []
    window = cfg.get("sliding_window")
    # Qwen configs carry a `sliding_window` value but only apply it when use_sliding_window is on.
    used = bool(cfg.get("use_sliding_window")) if arch in ("qwen2", "qwen3") else True
    too_short = window is not None and int(window) < max_pos
    if (used and too_short) or any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"{source}: sliding-window attention (sliding_window={window}, "
            f"max_position_embeddings={max_pos}) is not supported yet"
        )


def _rope(cfg: Mapping[str, Any], source: str) -> tuple[float, str | None, Mapping[str, Any]]:
    """(theta, rope type, its parameters) from either spelling: transformers 4's `rope_theta` +
    `rope_scaling`, or transformers 5's single `rope_parameters` dict."""
    params = cfg.get("rope_parameters")
    if params is not None and "rope_theta" not in params and "rope_type" not in params:
        raise UnsupportedModelError(
            f"{source}: per-layer-type rope_parameters {sorted(params)} are not supported"
        )
    params = dict(params or {})
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type"))
    scaling = cfg.get("rope_scaling")
    if scaling:  # the older spelling wins: a config with both was converted from it
        params |= scaling
        rope_type = scaling.get("rope_type", scaling.get("type"))
    return theta, rope_type, params


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path} has no *.safetensors weights (.bin is not supported)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"shards named in the index are missing: {missing}")
    return files


def _load_weights(files: Iterable[Path], config: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """Read only the tensors the graph uses, as float32; refuse tensors we do not know, because
    an unknown one (an extra bias, a different norm) means the graph would compute the wrong
    function."""
    wanted = expected_shapes(config)
    weights: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                if name in wanted:
                    weights[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
                elif not (
                    name.endswith(_IGNORED_SUFFIXES)
                    or (name == "lm_head.weight" and config.tie_word_embeddings)
                ):
                    unknown.append(name)
    if unknown:
        raise UnsupportedModelError(
            f"{source}: tensors the graph does not implement: {unknown[:8]}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    check_weights(config, weights, source)
    return weights


def _chat_template(path: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    """transformers >= 4.43 writes the template to chat_template.jinja; older ones into
    tokenizer_config.json, possibly as a list of named templates."""
    jinja = _read_text(path / "chat_template.jinja")
    if jinja is not None:
        return jinja
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _token_id(tokenizer: Tokenizer, token: Any) -> int | None:
    """Special tokens appear as a string or as a serialised AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_id(*values: Any) -> int | None:
    for value in values:
        ids = _ids(value)
        if ids:
            return ids[0]
    return None


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    text = _read_text(path)
    if text is None:
        if required:
            raise FileNotFoundError(f"{path} not found")
        return {}
    data: dict[str, Any] = json.loads(text)
    return data


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None
