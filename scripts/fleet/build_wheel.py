"""Build (or reuse) the runtime wheel of this checkout for rollout.yml and print its path.

    .venv/bin/python scripts/fleet/build_wheel.py   # -> .cache/edgert/wheels/<hash>/edgert-*.whl

The same wheel `edgert deploy` ships (edgert.tools.deploy.build_wheel: `pip wheel --no-deps`,
cached by a hash of the source files, so an unchanged checkout gives the same file and the boards
reuse their venv). Progress goes to stderr; stdout is the path alone.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from edgert.tools.deploy import DeployError, build_wheel, cache_dir, source_root  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None,
                   help="wheel cache (default: $EDGERT_CACHE or .cache/edgert in the checkout)")
    args = p.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            wheel = build_wheel(source_root(), args.cache or cache_dir())
    except DeployError as e:
        print(f"build_wheel: error: {e}", file=sys.stderr)
        return 1
    print(wheel.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
