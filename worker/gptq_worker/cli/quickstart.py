"""``gptq-worker quickstart``: the whole path offline on a small model trained here."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("quickstart", help="train a small model offline, quantize, check, compare")
    s.add_argument("--workdir", default="./gptq-quickstart", help="where models are written")
    s.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    s.add_argument("--group-size", dest="group_size", type=int, default=128)
    s.add_argument("--train-steps", dest="train_steps", type=int, default=300)
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gptq_worker.demo.quickstart import run_quickstart

    run_quickstart(args.workdir, args.bits, args.group_size, args.train_steps)
    return 0
