"""Load a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json) into a
`Checkpoint`.

Everything is read without torch or transformers (safetensors' numpy view, plain json), because
the export extra must not need them. Anything the graph would silently compute wrongly (sliding
windows, unknown RoPE scalings, extra biases, quantized checkpoints) is refused up front with a
message that names the feature, instead of producing a bundle that generates garbage.

Architectures beyond Llama's are mapped onto Llama's tensor names here, so the graph builder has
one vocabulary: Phi-3's fused qkv_proj / gate_up_proj are split, Gemma 2's four norms become
input / attn_output / post_attention (the MLP's input, as in Llama) / mlp_output norms, and its
(1 + w) norm weights are stored as the sum.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
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
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# config.json's activation name -> ModelConfig.hidden_act
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# transformers writes only what differs from a config class's defaults: these are the defaults
# of the keys the graph reads, for the architectures whose defaults are not Llama's
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
               "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "rms_norm_eps": 1e-6},
    "phi3": {"original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}
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
    if rope_type == "longrope":
        return {"rope_type": "longrope",
                "short_factor": [float(f) for f in _required(params, "short_factor", rope_type)]}
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
        if config.sandwich_norms:
            shapes |= {p + "attn_output_norm.weight": (h,), p + "mlp_output_norm.weight": (h,)}
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

    side = read_tokenizer_side(path, cfg)
    read = [path / "config.json", *files]
    read += [p for p in (path / "tokenizer.json", path / "tokenizer_config.json") if p.is_file()]
    provenance = {
        "kind": "hf",
        "path": str(path.resolve()),
        "architectures": cfg.get("architectures"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "files": {p.name: sha256_file(p) for p in read},
    }
    return Checkpoint(config=config, weights=weights, provenance=provenance, **side)


def read_tokenizer_side(path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a bundle takes from a HF directory besides the graph: tokenizer.json, the chat
    template, BOS / EOS ids and whether BOS is added (Checkpoint's field names). Shared with
    the optimum path, so both read a checkpoint's tokenizer the same way."""
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
    return {"tokenizer_json": tokenizer_json, "chat_template": _chat_template(path, tok_cfg),
            "bos_token_id": bos_id, "eos_token_ids": eos_ids, "add_bos_token": bool(add_bos)}


def hf_model_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict, refusing what the graph cannot run."""
    archs = cfg.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: architectures {archs} have no native paged graph builder (it knows "
            f"{', '.join(ARCHITECTURES)}); export it through optimum's dense-KV graph instead "
            "with `edgert export SRC --via optimum`, which runs any decoder optimum exports at "
            "the cost of a dense copy of the past every step"
        )
    cfg = {**_DEFAULTS.get(arch, {}), **cfg}
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(
            f"{source}: pre-quantized checkpoints ({method}) are not supported; use the float one"
        )
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{source}: activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
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
    layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    theta, rope_type, rope_params = _rope(cfg, source)
    rope_scaling = rope_scaling_config(rope_type, rope_params)
    if rope_type == "longrope":
        # transformers switches the whole batch to the long factors once any position passes
        # the pretraining context (and keeps the keys cached under the short ones): no paged
        # graph can be batch-invariant that way. The bundle keeps to the short factors and to
        # that context, where the two agree exactly.
        original = int(rope_params.get("original_max_position_embeddings")
                       or cfg["original_max_position_embeddings"])
        factor = float(rope_params.get("factor") or max_pos / original)
        assert rope_scaling is not None
        rope_scaling["attention_factor"] = float(
            rope_params.get("attention_factor")
            or (1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))))
        max_pos = min(max_pos, original)
    window, windowed = _sliding_window(cfg, arch, max_pos, layers, source)
    partial = float(rope_params.get("partial_rotary_factor")
                    or cfg.get("partial_rotary_factor") or 1.0)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    gemma2 = arch == "gemma2"
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        # Absent only in hand-written configs; every architecture here defaults to untied.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        rope_scaling=rope_scaling,
        hidden_act=ACTIVATIONS[act],
        rotary_dim=None if partial == 1.0 else int(head_dim * partial),
        embedding_multiplier=float(np.float32(cfg["hidden_size"] ** 0.5)) if gemma2 else 1.0,
        sandwich_norms=gemma2,
        attention_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma2 else None,
        attn_logit_softcap=_float_or_none(cfg.get("attn_logit_softcapping")) if gemma2 else None,
        final_logit_softcap=_float_or_none(cfg.get("final_logit_softcapping")),
        sliding_window=window,
        sliding_window_layers=windowed,
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _sliding_window(cfg: Mapping[str, Any], arch: str, max_pos: int, layers: int,
                    source: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers it applies to), as transformers decides it: a config's layer_types
    when present (transformers 5 writes them), else the architecture's rule. A window that
    covers the whole context masks nothing and is dropped."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        odd = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
        if odd:
            raise UnsupportedModelError(f"{source}: attention layer types {odd} not supported")
        windowed = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    elif arch == "gemma2":  # alternate layers, the first one sliding
        windowed = list(range(0, layers, 2))
    elif arch in ("qwen2", "qwen3"):  # only with use_sliding_window, from max_window_layers on
        start = int(cfg.get("max_window_layers") or 0)
        windowed = list(range(start, layers)) if cfg.get("use_sliding_window") else []
    elif arch in ("mistral", "phi3"):
        windowed = list(range(layers))
    else:
        windowed = []
    if window is None or int(window) >= max_pos or not windowed:
        return None, ()
    return int(window), tuple(windowed)


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
    """Read only the tensors the graph uses, as float32 under Llama's names; refuse tensors we
    do not know, because an unknown one (an extra bias, a different norm) means the graph would
    compute the wrong function."""
    wanted = expected_shapes(config)
    weights: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                parts = [(ours, cut) for ours, cut in _as_llama(config, name) if ours in wanted]
                if parts:
                    tensor = np.asarray(f.get_tensor(name), dtype=np.float32)
                    weights |= {ours: cut(tensor) for ours, cut in parts}
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


_Part = Callable[[np.ndarray], np.ndarray]
_GEMMA2_NORMS = {"post_attention_layernorm": "attn_output_norm",
                 "pre_feedforward_layernorm": "post_attention_layernorm",
                 "post_feedforward_layernorm": "mlp_output_norm"}


def _as_llama(config: ModelConfig, name: str) -> list[tuple[str, _Part]]:
    """The Llama-named tensors one HF tensor becomes, each with how to cut it out."""
    whole: _Part = lambda t: t  # noqa: E731
    head, _, leaf = name.rpartition(".")
    head, _, module = head.rpartition(".")
    if config.architecture == "phi3" and module == "qkv_proj" and leaf == "weight":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return [(f"{head}.q_proj.weight", lambda t: t[:q]),
                (f"{head}.k_proj.weight", lambda t: t[q:q + kv]),
                (f"{head}.v_proj.weight", lambda t: t[q + kv:])]
    if config.architecture == "phi3" and module == "gate_up_proj" and leaf == "weight":
        n = config.intermediate_size  # gate first, as Phi3MLP's chunk(2)
        return [(f"{head}.gate_proj.weight", lambda t: t[:n]),
                (f"{head}.up_proj.weight", lambda t: t[n:])]
    if config.architecture == "gemma2" and module.endswith("norm") and leaf == "weight":
        ours = f"{head}.{_GEMMA2_NORMS.get(module, module)}.weight".lstrip(".")
        # Gemma's norm multiplies by (1 + w) in float32: the same sum, once, at export
        return [(ours, lambda t: (np.float32(1.0) + t).astype(np.float32))]
    return [(name, whole)]


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
