"""A digest of the code that decides what an exported bundle contains, so a cache of bundles
(the tests', the benchmarks') never serves one built by an older exporter."""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def exporter_fingerprint() -> str:
    """The graph builder, the loaders and the bundle format: a change to any of them changes
    the digest."""
    h = hashlib.sha256()
    for path in sorted([*(REPO / "export").glob("*.py"), REPO / "edgert" / "bundle.py",
                        REPO / "edgert" / "runner" / "step_inputs.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]
