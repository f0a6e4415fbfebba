"""`edgert info`: what a bundle holds and the memory it needs on a board."""

from __future__ import annotations

from edgert.bundle import Bundle

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(bundle: Bundle) -> str:
    m, cfg = bundle.manifest, bundle.config
    kv_dtype = bundle.kv["dtype"]
    per_token = cfg.kv_bytes_per_token(_DTYPE_BYTES[kv_dtype])
    weights = bundle.weights_bytes()
    ctx = cfg.max_position_embeddings
    lines = [
        f"bundle      {bundle.path}",
        f"name        {bundle.name}  (format v{m['format_version']}, edgert {m['edgert_version']})",
        f"model       {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads x {cfg.head_dim}, "
        f"vocab {cfg.vocab_size}, context {ctx}",
        f"precision   {bundle.precision}  (graph opset {bundle.graph['opset']}, "
        f"{bundle.graph.get('flavour', 'portable')} flavour)",
        f"source      {m['provenance'].get('kind', '?')}: {m['provenance'].get('path', '?')}",
        "files:",
        *(f"  {name:<20} {human_bytes(f['bytes']):>10}  sha256 {f['sha256'][:16]}"
          for name, f in m["files"].items()),
        "memory:",
        f"  weights             {human_bytes(weights):>10}",
        f"  KV per token        {human_bytes(per_token):>10}  ({kv_dtype}, block size "
        f"{bundle.kv['block_size']})",
        f"  KV for 1 x {ctx:<7}  {human_bytes(per_token * ctx):>10}",
        f"  KV for 16 x 2048    {human_bytes(per_token * 16 * 2048):>10}",
        f"  weights + 512 MiB KV pool: {human_bytes(weights + (512 << 20))} "
        f"({(512 << 20) // per_token} tokens in the pool)",
        "providers on this machine (--provider; a server names the one in use in /v1/models):",
        *providers_here(),
    ]
    return "\n".join(lines)


def providers_here() -> list[str]:
    from edgert.runner.backends import PROVIDERS, unavailable

    return [f"  {p:<16}    {unavailable(p) or 'available'}" for p in PROVIDERS]
