"""Source -> Checkpoint: a HF checkpoint directory, a GGUF file, or a name `edgert pull` knows."""

from __future__ import annotations

from pathlib import Path

from export.checkpoint import Checkpoint


def load_source(src: str | Path, *, progress: bool = True) -> Checkpoint:
    path = Path(src)
    if path.is_dir():
        from export.hf_loader import load_hf_checkpoint

        return load_hf_checkpoint(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path}: expected a .gguf file or a Hugging Face checkpoint directory")
        from export.gguf_loader import load_gguf

        return load_gguf(path, progress=progress)
    from export.pull import known_models, pull

    if str(src) in known_models():
        return load_source(pull(str(src), progress=progress), progress=progress)
    raise FileNotFoundError(
        f"{src}: no such file or directory, and not a known model name "
        f"({', '.join(sorted(known_models()))})")
