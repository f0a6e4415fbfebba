"""The README's fit table: `edgert plan --device all` for several bundles, as one Markdown table
(rows: profiles; columns: bundles). Usage: scripts/plan_table.py BUNDLE... [--context N]."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    cols: list[dict[str, dict]] = []
    for b in args.bundles:
        proc = subprocess.run([sys.executable, "-m", "edgert", "plan", b, "--device", "all",
                               "--json", "--no-verify", "--context", str(args.context),
                               "--concurrency", str(args.concurrency)],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 1, 3):
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        cols.append({p["device"]: p for p in json.loads(proc.stdout)})
    names = sorted(cols[0])
    heads = [next(iter(c.values()))["precision"] for c in cols]
    print("| profile | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(cols))
    for n in names:
        cells = []
        for c in cols:
            p = c[n]
            act = next(x for x in p["lines"] if x["what"] == "activations")
            tag = "m" if act["source"].startswith("measured") else "e"
            cells.append(f"{p['verdict']}: {p['pool_bytes'] / 2**20:,.0f} MiB pool, "
                         f"{p['seqs_at_context']} x {p['context']} "
                         f"(act. {act['bytes'] / 2**20:,.0f} MiB {tag})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
