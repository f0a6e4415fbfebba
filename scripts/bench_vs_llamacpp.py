"""edgert against llama.cpp's server, side by side in one run (see bench_vs_llamacpp.sh).

Both servers get the very same requests: token-id prompts cut from one corpus tokenized with the
bundle's tokenizer (SmolLM2's GGUF carries the same vocabulary), `ignore_eos` so both emit exactly
the drawn number of tokens, streamed, at each concurrency level. One server runs at a time on
the same cores; each one's peak RSS is read from /proc (VmHWM) when its run ends, and each run
says what share of the cores went to other processes and to the hypervisor's steal meanwhile
(edgert/tools/cpu_share.py), flagged SHARED above 5%: a neighbour that slows one server's run
and not the other's makes the ratio meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
LLAMA = CACHE / "llamacpp"
SDIST = "llama-cpp-python==0.3.36"
EDGERT = [str(ROOT / ".venv/bin/edgert")]
EXPORTS = {  # bundle flavour -> `edgert export` precision arguments
    "fp32": [],
    "int8": ["--precision", "int8"],
    "int4": ["--precision", "int4", "--group-size", "32", "--asymmetric"],
    # the same with a float16 KV pool: half the bytes per cached token
    "int8kv16": ["--precision", "int8", "--kv-dtype", "float16"],
    "int4kv16": ["--precision", "int4", "--group-size", "32", "--asymmetric",
                 "--kv-dtype", "float16"],
    # int8kv16 with blocks of 64 inputs per scale instead of 32
    "int8kv16b64": ["--precision", "int8", "--kv-dtype", "float16", "--int8-block", "64"],
    # int8kv16b64 with the MLP's gate_up on MatMulInteger (--int8-kernel mixed): for AVX2
    "int8mixkv16b64": ["--precision", "int8", "--kv-dtype", "float16", "--int8-block", "64",
                       "--int8-kernel", "mixed"],
    # int4 with MatMulNBits' own uint8 zero points instead of a float minimum: no second GEMM,
    # but Q4_1's minimum off its grid (measured +11.9% perplexity, top-1 83.7%)
    "int4kv16z": ["--precision", "int4", "--group-size", "32", "--asymmetric", "--zero-point",
                  "int", "--kv-dtype", "float16"],
    # int8kv16 with the K/V placed by ScatterND instead of in place (--kv-write)
    "int8kv16sc": ["--precision", "int8", "--kv-dtype", "float16", "--kv-write", "scatter"],
}


def cpu_flags() -> str:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")
    keep = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if x in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(keep)}"


def build_llamacpp() -> Path:
    """llama-server built natively from the registry sdist, once."""
    server = LLAMA / "build" / "bin" / "llama-server"
    if server.exists():
        return server
    LLAMA.mkdir(parents=True, exist_ok=True)
    sdists = sorted(LLAMA.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:",
                        "--no-deps", "-d", str(LLAMA)], check=True)
        sdists = sorted(LLAMA.glob("llama_cpp_python-*.tar.gz"))
    src = LLAMA / sdists[-1].name.removesuffix(".tar.gz")
    if not src.exists():
        with tarfile.open(sdists[-1]) as t:
            t.extractall(LLAMA, filter="data")
    print(f"building llama-server from {src.name} (once; several minutes on 2 cores)", flush=True)
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(LLAMA / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"], check=True)
    subprocess.run(["cmake", "--build", str(LLAMA / "build"), "--target", "llama-server",
                    "llama-bench", "-j", str(os.cpu_count() or 2)], check=True)
    return server


def variant(name: str) -> tuple[str, list[str]]:
    """'int8kv16+spinning=step' -> ('int8kv16', ['--spinning', 'step']): one bundle served with
    other `edgert serve` flags, a run of its own in the same go."""
    base, *flags = name.split("+")
    if base not in EXPORTS and not Path(base, "manifest.json").is_file():
        raise SystemExit(f"unknown bundle {base!r}: one of {', '.join(EXPORTS)}, or the path "
                         "of a bundle")
    extra = []
    for flag in flags:
        key, _, value = flag.partition("=")
        extra += [f"--{key}", *([value] if value else [])]
    return base, extra


def model_and_bundles(names: list[str]) -> tuple[Path, dict[str, Path]]:
    env = {**os.environ, "EDGERT_CACHE": str(CACHE / "edgert")}
    out = subprocess.run([*EDGERT, "pull", "smollm2-135m"], env=env, check=True,
                         capture_output=True, text=True).stdout
    gguf = next(Path(w) for w in out.split() if w.endswith(".gguf"))
    bundles = {}
    for name in dict.fromkeys(variant(n)[0] for n in names):
        if name not in EXPORTS:  # a bundle's path: served as it is
            bundles[name] = Path(name)
            continue
        path = CACHE / "bench_vs_llamacpp" / "bundles" / name
        stamp = path.with_name(name + ".stamp")  # beside the bundle: its files are checksummed
        want = _export_stamp(EXPORTS[name])
        valid = subprocess.run([*EDGERT, "info", str(path)], capture_output=True).returncode == 0
        if not (valid and stamp.is_file() and stamp.read_text() == want):
            subprocess.run([*EDGERT, "export", "smollm2-135m", "-o", str(path), "--force",
                            *EXPORTS[name]], env=env, check=True)
            stamp.write_text(want)
        bundles[name] = path
    return gguf, bundles


def _export_stamp(args: list[str]) -> str:
    """What a cached bundle was exported with: its arguments and the exporter's source. A valid
    bundle from an older graph builder or other arguments would be measured as the new one."""
    from export.fingerprint import exporter_fingerprint

    return json.dumps({"args": args, "export": exporter_fingerprint()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _wait_healthy(target: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    from edgert.client import _target

    base, uds = _target(target)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with httpx.Client(base_url=base, transport=httpx.HTTPTransport(uds=uds),
                              timeout=5) as c:
                r = c.get("/ready")  # edgert's readiness; llama-server has only /health
                if r.status_code == 404:
                    r = c.get("/health")
                if r.status_code == 200:
                    return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError("server not healthy in time")


@contextlib.contextmanager
def _serving(cmd: list[str], target: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_healthy(target, proc)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_server(cmd: list[str], target: str, args: argparse.Namespace, corpus: list[int],
               max_model_len: int) -> dict:
    from edgert.tools.bench_serve import run_bench
    from edgert.tools.cpu_share import CpuWatch

    with _serving(cmd, target) as proc:
        watch = CpuWatch([proc.pid])
        levels = asyncio.run(run_bench(
            target, args.concurrency, args.requests, args.prompt_len, args.output_len,
            "uniform", None, args.seed, 600.0, corpus=corpus, max_model_len=max_model_len,
            keepalive=False))  # llama-server closes idle connections; both get the same
        share = watch.stop()
        rss = _peak_rss(proc.pid)
    return {"levels": [{**asdict(r), "out_tok_s": r.output_tokens_per_s} for r in levels],
            "peak_rss": rss, "cpu_share": asdict(share), "shared": share.shared}


CURVE_OUTPUT = 64


def run_curve(cmd: list[str], target: str, lengths: list[int], corpus: list[int],
              seed: int) -> dict[int, float]:
    """TPOT p50 (seconds) of one stream after a prompt of each length: how a step's cost grows
    with the context it attends to."""
    from edgert.tools.bench_serve import run_bench
    from edgert.tools.cpu_share import CpuWatch

    out = {}
    with _serving(cmd, target) as proc:
        for n in lengths:
            watch = CpuWatch([proc.pid])
            [level] = asyncio.run(run_bench(
                target, [1], 2, n, CURVE_OUTPUT, "fixed", None, seed, 900.0, corpus=corpus,
                max_model_len=max(lengths) + CURVE_OUTPUT, keepalive=False))
            out[n] = level.tpot.get("p50", float("nan"))
            print(f"  context {n}: TPOT p50 {out[n] * 1000:.1f} ms; "
                  f"{watch.stop().describe()}", flush=True)
    return out


def ratios(ours: dict, peer: dict) -> list[dict]:
    rows = []
    for a, b in zip(ours["levels"], peer["levels"]):
        def r(x: float | None, y: float | None) -> float | None:
            return x / y if x and y else None
        rows.append({"concurrency": a["concurrency"],
                     "out_tok_s": r(a["out_tok_s"], b["out_tok_s"]),
                     "ttft_p50": r(a["ttft"].get("p50"), b["ttft"].get("p50")),
                     "tpot_p50": r(a["tpot"].get("p50"), b["tpot"].get("p50"))})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundles", default="fp32,int8,int4",
                    help=f"edgert bundles to compare ({', '.join(EXPORTS)}, or a bundle's path, "
                         "served as it is); BUNDLE+flag=value "
                         "serves it with `edgert serve --flag value` as a run of its own, "
                         "e.g. int8kv16+spinning=step")
    ap.add_argument("--requests", type=int, default=48, help="requests per level (48)")
    ap.add_argument("--concurrency", default="1,16", help="levels (1,16)")
    ap.add_argument("--prompt-len", type=int, default=141, help="mean prompt tokens (141)")
    ap.add_argument("--output-len", type=int, default=80, help="mean output tokens (80)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(CACHE / "bench_vs_llamacpp"))
    ap.add_argument("--kv-memory", default=None,
                    help="edgert's --kv-memory (default: room for --kv-tokens)")
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="size each edgert pool to hold this many tokens in its bundle's KV "
                         "dtype (default: llama.cpp's context, 1024 per slot: equal capacity)")
    ap.add_argument("--context-curve", default="256,1024,4096,8000", metavar="LENGTHS",
                    help="TPOT of one stream after prompts of these lengths, both servers "
                         "(default 256,1024,4096,8000; '' skips it)")
    ap.add_argument("--curve-bundle", default=None,
                    help="the bundle the curve runs (default: the last of --bundles)")
    ap.add_argument("--skip-load", action="store_true",
                    help="only the context curve, not the concurrency levels")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    names = [n for n in args.bundles.split(",") if n]
    print(f"CPU: {cpu_flags()}", flush=True)
    server = build_llamacpp()
    curve_name = args.curve_bundle or names[-1]
    gguf, bundles = model_and_bundles(list(dict.fromkeys([*names, curve_name])))
    from edgert.bundle import Bundle
    from edgert.text.tokenizer import Tokenizer
    from edgert.tools.bench_serve import corpus_text

    tok = Tokenizer.from_bundle(Bundle.load(bundles[variant(names[0])[0]], verify=False))
    corpus = tok.encode(corpus_text(random.Random(args.seed), args.prompt_len),
                        add_special_tokens=False)
    report: dict = {"cpu": cpu_flags(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "workload": {k: getattr(args, k) for k in ("requests", "concurrency",
                                                               "prompt_len", "output_len")},
                    "runs": {}}
    port = _free_port()
    np_slots = max(args.concurrency)
    from edgert.core.fit_plan import DTYPE_BYTES

    kv_tokens = args.kv_tokens or 1024 * np_slots

    def kv(bundle: Path) -> list[str]:
        if args.kv_memory:
            return ["--kv-memory", args.kv_memory]
        b = Bundle.load(bundle, verify=False)
        per_token = b.config.kv_bytes_per_token(DTYPE_BYTES[b.kv["dtype"]])
        blocks = -(-kv_tokens // int(b.kv["block_size"])) + 1  # + the null block
        return ["--kv-memory", str(blocks * int(b.kv["block_size"]) * per_token)]

    report["kv_tokens"] = kv_tokens
    if not args.skip_load:
        report["runs"]["llama.cpp"] = run_server(
            [str(server), "-m", str(gguf), "-t", str(args.threads), "-np", str(np_slots),
             "-c", str(1024 * np_slots), "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}", args, corpus, 1024)
        for name in names:
            sock = Path(tempfile.mkdtemp()) / "edgert.sock"
            base, extra = variant(name)
            report["runs"][name] = run_server(
                [*EDGERT, "serve", str(bundles[base]), "--socket", str(sock), "--no-verify",
                 *kv(bundles[base]), *extra], str(sock), args, corpus, 1024)
            shutil.rmtree(sock.parent, ignore_errors=True)
        print_load(report, names)
    lengths = [int(n) for n in args.context_curve.split(",") if n]
    if lengths:
        report["curve"] = curve(args, server, gguf, curve_name, bundles, lengths, tok)
        report["curve"]["bundle"] = curve_name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if not args.skip_load:
        _plot(report, names, out / "report.png")
    print(f"\nreport: {out / 'report.json'}")
    return 0


def print_load(report: dict, names: list[str]) -> None:
    peer = report["runs"]["llama.cpp"]
    print(f"\nedgert's pools hold {report['kv_tokens']} tokens, as llama.cpp's cache does")
    print("ratios edgert / llama.cpp (out tok/s: higher is better; TTFT, TPOT, RSS: lower)")
    print(f"{'bundle':8} {'conc':>4} {'out tok/s':>9} {'TTFT p50':>9} {'TPOT p50':>9} "
          f"{'peak RSS':>9}")
    for name in names:
        run = report["runs"][name]
        run["ratios"] = ratios(run, peer)
        for row in run["ratios"]:
            cells = [f"{row[k]:9.2f}x" if row[k] else "      n/a" for k in
                     ("out_tok_s", "ttft_p50", "tpot_p50")]
            print(f"{name:8} {row['concurrency']:>4} {' '.join(cells)} "
                  f"{run['peak_rss'] / peer['peak_rss']:8.2f}x")
    from edgert.tools.cpu_share import CpuShare

    for name, run in report["runs"].items():
        lv = {x["concurrency"]: x for x in run["levels"]}
        print(f"{name:9} peak RSS {run['peak_rss'] >> 20} MiB; " + "; ".join(
            f"c={c}: {x['out_tok_s']:.1f} out tok/s, TPOT p50 "
            f"{x['tpot'].get('p50', float('nan')) * 1000:.1f} ms" for c, x in lv.items()))
        print(f"{'':9} during it: {CpuShare(**run['cpu_share']).describe()}")
    if any(run["shared"] for run in report["runs"].values()):
        print("another job shared the cores during a run: its ratios measure that job too; "
              "run again on a quiet machine")


def curve(args: argparse.Namespace, server: Path, gguf: Path, name: str,
          bundles: dict[str, Path], lengths: list[int], tok) -> dict:
    """Both servers with room for one sequence of the longest context; the slope is the
    least-squares ms of TPOT per 1,000 tokens of context."""
    import numpy as np

    from edgert.tools.bench_serve import corpus_text

    need = max(lengths) + CURVE_OUTPUT
    corpus = tok.encode(corpus_text(random.Random(args.seed), need + 64),
                        add_special_tokens=False)
    while len(corpus) < need + 64:
        corpus = corpus + corpus
    port = _free_port()
    print(f"\nTPOT against context (one stream, {CURVE_OUTPUT} output tokens)", flush=True)
    print("llama.cpp:", flush=True)
    peer = run_curve([str(server), "-m", str(gguf), "-t", str(args.threads), "-np", "1",
                      "-c", str(need + 64), "--host", "127.0.0.1", "--port", str(port)],
                     f"http://127.0.0.1:{port}", lengths, corpus, args.seed)
    sock = Path(tempfile.mkdtemp()) / "edgert.sock"
    print(f"edgert {name}:", flush=True)
    base, extra = variant(name)
    ours = run_curve([*EDGERT, "serve", str(bundles[base]), "--socket", str(sock), "--no-verify",
                      "--kv-memory", args.kv_memory or "1GiB", "--max-model-len", str(need),
                      "--max-num-seqs", "1", *extra], str(sock), lengths, corpus, args.seed)
    shutil.rmtree(sock.parent, ignore_errors=True)
    xs = np.array(lengths, float) / 1000

    def slope(d: dict[int, float]) -> float:  # a line needs two lengths
        if len(set(lengths)) < 2:
            return float("nan")
        return float(np.polyfit(xs, [d[n] * 1000 for n in lengths], 1)[0])

    res = {"lengths": lengths, "llama.cpp": peer, "edgert": ours,
           "slope_ms_per_1k": {"llama.cpp": slope(peer), "edgert": slope(ours)}}
    print(f"{'context':>8} {'llama.cpp ms':>13} {'edgert ms':>10} {'ratio':>6}")
    for n in lengths:
        print(f"{n:8} {peer[n] * 1000:13.1f} {ours[n] * 1000:10.1f} {ours[n] / peer[n]:6.2f}x")
    sl = res["slope_ms_per_1k"]
    if len(set(lengths)) < 2:
        print("slope: needs two or more --context-curve lengths")
        return res
    print(f"slope: llama.cpp {sl['llama.cpp']:.2f} ms, edgert {sl['edgert']:.2f} ms of TPOT per "
          f"1k tokens of context ({sl['edgert'] / sl['llama.cpp']:.2f}x)")
    return res


def _plot(report: dict, names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in ["llama.cpp", *names]:
        lv = report["runs"][name]["levels"]
        xs = [x["concurrency"] for x in lv]
        axes[0].plot(xs, [x["out_tok_s"] for x in lv], marker="o", label=name)
        axes[1].plot(xs, [x["ttft"].get("p50", 0) * 1000 for x in lv], marker="o", label=name)
        axes[2].plot(xs, [x["tpot"].get("p50", 0) * 1000 for x in lv], marker="o", label=name)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.suptitle(report["cpu"])
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
