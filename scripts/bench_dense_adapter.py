"""What the dense-past adapter costs per decode step against the native paged graph, on the SAME
random Llama-shaped checkpoint exported both ways (fp32): the same backend call the engine makes
(`run(step_inputs, slot_mapping)`, pool write included), S rows decoding at a context length,
native and dense interleaved so a neighbour's load hits both alike. Prints one row per
(S, context) with the median milliseconds per step and the ratio.

    .venv/bin/python scripts/bench_dense_adapter.py [--contexts 64 256 1024] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_checkpoint(path: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (path / "config.json").is_file():
        return path
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 128, max_position_embeddings=4096,
                         rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def time_steps(backend, shape: tuple[int, int, int], ctx: int, block_size: int,
               steps: int) -> list[float]:
    from edgert.runner.step_inputs import layout

    S, _, B = shape
    tables = [list(range(1 + s * B, 1 + (s + 1) * B)) for s in range(S)]
    step = layout(shape, [[5]] * S, [ctx] * S, tables, [[0]] * S, block_size)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        backend.run(step.inputs, step.slot_mapping)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a Llama-family HF checkpoint directory instead of the random one")
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "edgert" / "bench-dense")
    args = ap.parse_args()

    from edgert.bundle import Bundle
    from edgert.config import BackendConfig
    from edgert.runner.dense_backend import DenseBackend
    from edgert.runner.ort_backend import OrtBackend
    from export.bundle_writer import write_bundle
    from export.optimum_export import export_via_optimum
    from export.pipeline import load_source

    ckpt = args.checkpoint or make_checkpoint(args.work / "llama", args.layers, args.hidden,
                                              args.vocab)
    native, dense = args.work / "native", args.work / "dense"
    if not native.is_dir():
        write_bundle(load_source(ckpt), native, progress=False)
    if not dense.is_dir():
        export_via_optimum(ckpt, dense, progress=False)
    bs = 16
    cfg = Bundle.load(native).config
    tables = 1 if cfg.tie_word_embeddings else 2
    params = tables * cfg.vocab_size * cfg.hidden_size + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size
        * cfg.intermediate_size)
    print(f"{ckpt.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, "
          f"{params / 1e6:.1f}M params; fp32; ORT CPU, {args.threads} threads")
    need = max(args.seqs) * (-(-(max(args.contexts) + 1) // bs)) + 1
    config = BackendConfig(threads=args.threads)
    backends = {"native": OrtBackend(Bundle.load(native), need, bs, config),
                "dense": DenseBackend(Bundle.load(dense), need, bs, config)}
    print(f"{'S':>3} {'context':>8} {'native ms':>10} {'dense ms':>9} {'dense/native':>13}")
    for S in args.seqs:
        for ctx in args.contexts:
            shape = (S, 1, -(-(ctx + 1) // bs))
            times: dict[str, list[float]] = {k: [] for k in backends}
            for b in backends.values():  # warm-up
                time_steps(b, shape, ctx, bs, 3)
            for _ in range(args.rounds):
                for name, b in backends.items():
                    times[name] += time_steps(b, shape, ctx, bs, args.steps)
            n, d = (statistics.median(times[k]) * 1e3 for k in ("native", "dense"))
            print(f"{S:>3} {ctx:>8} {n:>10.3f} {d:>9.3f} {d / n:>12.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
