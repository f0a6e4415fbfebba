"""The GPU check, in two halves (run through scripts/gpu_check.sh).

prepare  (here, on a CPU machine with the export extra): tiny random Llama bundles in the portable
         flavours TensorRT builds (fp32, fp16, int8, int4), plus pytest's pure-Python wheels, into
         .cache/gpu_check/ (git-ignored, well under 10 MB), to travel with the checkout.
run      (on the GPU machine, which has no network and only what is installed there: a Python
         with onnxruntime-gpu and/or TensorRT, pycuda, numpy, tokenizers, jinja2): reports what
         it found, runs tests/test_backend_contract.py on every prepared bundle (which builds the
         TensorRT plans it needs), `edgert build-engine` once through the CLI, and `edgert bench
         --offline` for every backend that can run; writes one JSON report saying what ran,
         what passed, and what could not run and why.

The README's "what was verified where" changes only from such a report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / ".cache" / "gpu_check"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("cpu", "cuda", "tensorrt", "tensorrt-native")


def prepare(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from export.bundle_writer import write_bundle
    from export.pipeline import load_source
    from export.quantize import QuantConfig
    from tests.tiny_models import make_tiny

    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "bundles").mkdir(parents=True)
    _, ckpt_dir = make_tiny("llama", OUT / "hf", seed=3)
    ckpt = load_source(ckpt_dir)
    made = {}
    for precision in PRECISIONS:
        quant = None if precision == "fp32" else QuantConfig(
            precision=precision, flavour="portable", method="rtn")
        try:
            write_bundle(ckpt, OUT / "bundles" / precision, progress=False,
                         name=f"tiny-llama-{precision}", quant=quant)
            made[precision] = "ok"
        except Exception as e:  # report, keep the others
            made[precision] = f"not prepared: {e}"
    shutil.rmtree(OUT / "hf")
    wheels = OUT / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                           str(OUT / "wheels"), "pytest", "pluggy", "iniconfig", "packaging"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        for whl in (OUT / "wheels").glob("*.whl"):
            shutil.unpack_archive(str(whl), str(wheels), "zip")
        shutil.rmtree(OUT / "wheels")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    (OUT / "prepared.json").write_text(json.dumps(
        {"bundles": made, "pytest": proc.returncode == 0, "bytes": size,
         "smollm2_int4": "not included: its portable int4 bundle is ~90 MB, beyond the few "
                         "tens of MB this folder may carry"}, indent=2))
    print(f"prepared {OUT} ({size / 1e6:.1f} MB): {made}")
    return 0


def _sh(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
        ) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-6000:]


def _versions(py: str) -> dict[str, str]:
    probe = r"""
import json, importlib
out = {}
for mod in ("onnxruntime", "tensorrt", "pycuda", "numpy", "tokenizers"):
    try:
        out[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:
        out[mod] = f"missing ({type(e).__name__})"
try:
    import onnxruntime as ort
    out["onnxruntime_providers"] = ort.get_available_providers()
except Exception:
    pass
try:
    import pycuda.driver as cuda
    cuda.init()
    d = cuda.Device(0)
    out["gpu"] = d.name()
    out["compute_capability"] = "%d.%d" % d.compute_capability()
    out["cuda_driver"] = cuda.get_driver_version()
    out["cuda_runtime_pycuda_built"] = ".".join(map(str, cuda.get_version()))
except Exception as e:
    out["gpu"] = f"not visible ({e})"
print(json.dumps(out))
"""
    code, text = _sh([py, "-c", probe], timeout=120)
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"probe_failed": text}


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    py = args.python
    if not (OUT / "prepared.json").exists():
        print(f"nothing prepared in {OUT}: run `scripts/gpu_check.sh --prepare` on a CPU "
              "machine first, and bring the checkout with its .cache/gpu_check", file=sys.stderr)
        return 2
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(OUT / "site")])}
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": platform.node(), "machine": platform.machine(),
                    "python": py, "versions": _versions(py), "bundles": {}}
    _, smi = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                  "--format=csv,noheader"], timeout=30)
    report["nvidia_smi"] = smi.strip()
    reasons_code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
                    "from edgert.runner.backends import PROVIDERS, unavailable; "
                    "print(json.dumps({p: unavailable(p) for p in PROVIDERS}))")
    code, text = _sh([py, "-c", reasons_code, str(REPO)], env)
    try:
        report["providers"] = json.loads(text.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        report["providers"] = {"error": text}
    for bundle in sorted((OUT / "bundles").iterdir()):
        entry: dict = {}
        junit = OUT / f"contract-{bundle.name}.xml"
        code, text = _sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                          "tests/test_backend_contract.py", f"--junitxml={junit}",
                          "-o", "addopts="], {**env, "EDGERT_CONTRACT_BUNDLE": str(bundle)},
                         timeout=args.timeout)
        entry["contract"] = {"exit": code, "summary": text.strip().splitlines()[-1:],
                             "skips": [ln for ln in text.splitlines() if "SKIPPED" in ln],
                             "failures": [ln for ln in text.splitlines()
                                          if ln.startswith("FAILED")]}
        entry["bench"] = {}
        for provider in PROVIDERS:
            if (report.get("providers") or {}).get(provider):
                entry["bench"][provider] = f"not run: {report['providers'][provider]}"
                continue
            # the plan the contract suite built for its pool (tests/test_backend_contract.DEVICE)
            extra = ["--device", "t4-16gb"] if provider == "tensorrt-native" else []
            code, text = _sh([py, "-m", "edgert", "bench", str(bundle), "--offline",
                              "--provider", provider, "--requests", "8", "--prompt-len", "24",
                              "--output-len", "16", "--concurrency", "4", "--kv-memory", "1MiB",
                              "--block-size", "4", "--max-model-len", "160",
                              "--max-num-seqs", "8", "--max-num-batched-tokens", "32",
                              "--no-verify", *extra], env, timeout=args.timeout)
            entry["bench"][provider] = {"exit": code, "lines": text.strip().splitlines()[-3:]}
        report["bundles"][bundle.name] = entry
        if time.monotonic() - t0 > args.budget:
            report["stopped"] = f"time budget of {args.budget} s reached"
            break
    code, text = _sh([py, "-m", "edgert", "build-engine", str(OUT / "bundles" / "int4"),
                      "--device", args.device, "--kv-memory", "1MiB", "--block-size", "4",
                      "--max-model-len", "160", "--no-verify"], env, timeout=args.timeout)
    report["build_engine_cli"] = {"exit": code, "lines": text.strip().splitlines()[-4:]}
    report["seconds"] = round(time.monotonic() - t0, 1)
    path = Path(args.report)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("versions", "providers", "seconds")}, indent=2))
    print(f"report: {path}")
    failed = any(b["contract"]["exit"] not in (0, 5) for b in report["bundles"].values())
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="half", required=True)
    sub.add_parser("prepare", help="make the tiny bundles and pytest wheels (CPU machine)")
    r = sub.add_parser("run", help="run everything that can run on this GPU machine")
    r.add_argument("--python", default=sys.executable,
                   help="the Python that has the GPU packages (default: this one)")
    r.add_argument("--device", default="t4-16gb",
                   help="device profile for the build-engine CLI check (default t4-16gb)")
    r.add_argument("--report", default=str(REPO / "gpu_check_report.json"))
    r.add_argument("--timeout", type=float, default=300, help="per command, seconds")
    r.add_argument("--budget", type=float, default=420, help="whole run, seconds")
    args = p.parse_args()
    return prepare(args) if args.half == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
