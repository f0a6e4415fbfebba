"""`edgert build-engine BUNDLE --device PROFILE`: on the board, the bundle's portable ONNX becomes
the TensorRT engine `--provider tensorrt-native` serves, for the same pool and shapes that
`edgert serve --device PROFILE` (with the same engine flags) plans. Refuses clearly where
TensorRT or a GPU is missing."""

from __future__ import annotations

import argparse
import sys

from edgert.bundle import PAGED, Bundle
from edgert.config import add_engine_args, engine_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-engine", help="build the TensorRT engine of a bundle, on the board",
        description="Build BUNDLE's portable ONNX graph into a TensorRT engine for this board: "
                    "strongly typed, two optimisation profiles (decode and prefill chunks) over "
                    "the scheduler's shape menu, the KV pool's size fixed from the device "
                    "profile's plan, a timing cache, the builder's workspace bounded by the "
                    "profile. Written to BUNDLE/engines/<profile>-trt<version>-sm<cc>.plan and "
                    "recorded in the manifest; serve it with `edgert serve BUNDLE --device "
                    "PROFILE --provider tensorrt-native` and the same engine flags. Needs "
                    "TensorRT (JetPack's, on a Jetson) and a GPU.")
    p.add_argument("bundle", help="bundle directory (a portable flavour: fp16, int8, int4)")
    p.add_argument("--workspace", default=None,
                   help="builder workspace limit (e.g. 512MiB); default: the device profile's")
    add_engine_args(p)
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    import devices
    from edgert.config import parse_memory
    from edgert.engine.llm_engine import plan_engine
    from edgert.runner.tensorrt_build import BuildError, build_engine

    if not args.device:
        print("edgert build-engine: error: --device PROFILE is required (the engine is built "
              f"for one board; known: {', '.join(devices.names())})", file=sys.stderr)
        return 2
    profile = devices.load(args.device)
    if not profile.tensorrt:
        print(f"edgert build-engine: error: device profile {profile.name!r} has no TensorRT",
              file=sys.stderr)
        return 2
    bundle = Bundle.load(args.bundle, verify=not args.no_verify)
    if bundle.convention != PAGED:
        print(f"edgert build-engine: error: {bundle.path} is a {bundle.convention} bundle "
              "(exported --via optimum), which runs only on the CPU provider", file=sys.stderr)
        return 2
    if bundle.graph.get("flavour") == "cpu":
        print(f"edgert build-engine: error: {bundle.path} is a cpu-flavour bundle (ONNX "
              "Runtime's fused CPU kernels); export with --flavour portable for TensorRT",
              file=sys.stderr)
        return 2
    plan = plan_engine(bundle, engine_config_from_args(args))
    workspace = parse_memory(args.workspace) if args.workspace else profile.trt_workspace_bytes
    try:
        build_engine(bundle, profile.name, plan.menu, plan.num_blocks, workspace)
    except BuildError as e:
        print(f"edgert build-engine: error: {e}", file=sys.stderr)
        return 1
    return 0
