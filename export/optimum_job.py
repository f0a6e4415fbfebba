"""The half of `edgert export --via optimum` that runs INSIDE the optimum venv
(export/optimum_env.py): `python optimum_job.py MODEL_DIR OUT_DIR`. A standalone script,
importing nothing from edgert or export/, because that venv holds optimum and transformers 4.x
and not this project.

Exit status 0: OUT_DIR/model.onnx written. 3: optimum cannot export this architecture as a
decoder with a KV cache (stderr names the ones it can). Anything else: optimum's own failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASK = "text-generation-with-past"


def decoder_model_types() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the registry)
    from optimum.exporters.tasks import TasksManager

    return sorted(t for t, by_exporter in TasksManager._SUPPORTED_MODEL_TYPE.items()
                  if TASK in by_exporter.get("onnx", {}))


def main(model_dir: str, out_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = str(config.get("model_type", ""))
    known = decoder_model_types()
    if model_type not in known:
        print(f"optimum-onnx cannot export model_type {model_type!r} as "
              f"{TASK}; it can export: {', '.join(known)}", file=sys.stderr)
        return 3
    from optimum.exporters.onnx import main_export

    main_export(model_dir, out_dir, task=TASK, local_files_only=True, device="cpu",
                do_validation=True)
    if not (Path(out_dir) / "model.onnx").is_file():
        print(f"optimum wrote no model.onnx into {out_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
