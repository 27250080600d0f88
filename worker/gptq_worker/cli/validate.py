"""``gptq-worker validate``: check a GPTQ checkpoint and say which serving kernels load it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("validate", help="check a GPTQ checkpoint and list serving kernels")
    v.add_argument("checkpoint")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptq_compat.rules import sm_text
    from gptq_worker.cli.flags import UsageError
    from gptq_worker.format.validate import validate_checkpoint

    if not Path(args.checkpoint).is_dir():
        what = "does not exist" if not Path(args.checkpoint).exists() else "is not a directory"
        raise UsageError(f"checkpoint {args.checkpoint} {what}; pass a checkpoint directory")
    report = validate_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 1 if report.errors else 0
    status = "FAILED" if report.errors else "OK"
    print(f"{args.checkpoint}: {status} ({len(report.modules)} quantized modules)")
    for err in report.errors:
        print(f"  error: {err}")
    for warn in report.warnings:
        print(f"  warning: {warn}")
    engine = None
    for v in report.verdicts:
        if v.engine is not engine:
            engine = v.engine
            print(f"{engine.label} ({engine.how_checked}):")
        mark = "yes" if v.loads else "no "
        why = "" if v.loads else ": " + "; ".join(v.reasons)
        print(f"  {mark} {v.kernel.name:20s} [{sm_text(v.kernel)}]{why}")
    return 1 if report.errors else 0
