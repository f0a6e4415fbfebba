"""`edgert plan BUNDLE --device PROFILE`: the fit report before a model goes on a board. The
same plan `serve --device` and `--kv-memory auto` size their pool with, so what it says is what
the service will do, and a bundle that cannot fit is refused here, not OOM-killed there."""

from __future__ import annotations

import argparse
import json
import sys

from edgert.bundle import Bundle
from edgert.config import add_engine_args, engine_config_from_args

EXIT = {"fits": 0, "does not fit": 1, "fits with a smaller pool": 3}


def _plan(args: argparse.Namespace) -> int:
    import devices
    from edgert.core.fit_plan import render
    from edgert.engine.device_fit import host_profile, plan_for_device

    names = devices.names() if args.device == "all" else [args.device or host_profile()]
    bundle = Bundle.load(args.bundle, verify=not args.no_verify)
    plans = []
    context, seqs = args.max_model_len, args.max_num_seqs
    for name in names:
        args.device, args.max_model_len, args.max_num_seqs = name, args.context or context, seqs
        config = engine_config_from_args(args)
        plans.append(plan_for_device(bundle, config, name, context=args.context,
                                     concurrency=args.concurrency,
                                     measure=not args.estimate))
    if args.json:
        json.dump([p.to_json() for p in plans] if len(plans) > 1 else plans[0].to_json(),
                  sys.stdout, indent=1)
        print()
    else:
        print("\n\n".join(render(p) for p in plans))
    return max(EXIT[p.verdict] for p in plans)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="will a bundle fit a board? weights, activations, reserves, the KV pool",
        description="Print the fit plan of BUNDLE on a device profile: the memory the board has, "
                    "what the weights, the activations (measured on ONNX Runtime's CPU provider "
                    "for a CPU target, estimated for TensorRT and labelled so), the CUDA context "
                    "and the OS reserve take, the TensorRT engine build's peak, and the KV pool "
                    "left: how many tokens it holds and how many sequences of --context tokens "
                    "run at once, with a verdict (fits / fits with a smaller pool / does not "
                    "fit, and the precision that would). `serve --device` sizes its pool with "
                    "this plan. Exit status: 0 fits, 3 fits with a smaller pool, 1 does not "
                    "fit, 2 usage error.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence, prompt + output (default: the profile's "
                        "max_model_len, at most the model's context)")
    p.add_argument("--concurrency", type=int, default=None, metavar="C",
                   help="sequences of N tokens wanted at once (default: --max-num-seqs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="estimate CPU activations from the shapes instead of measuring them")
    add_engine_args(p)
    for action in p._actions:
        if action.dest == "device":
            action.help = ("device profile (devices/*.json), or 'all' for every profile "
                           "(default: this machine's generic CPU profile)")
    p.set_defaults(func=_plan)
