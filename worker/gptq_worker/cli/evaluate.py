"""``gptq-worker eval``: perplexity of a model or GPTQ checkpoint on a text file."""

from __future__ import annotations

import argparse
import json

from gptq_worker.cli.flags import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="perplexity of a model or GPTQ checkpoint on a text file")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-samples", dest="max_samples", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    e.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gptq_worker.device import resolve_device, resolve_dtype
    from gptq_worker.eval.perplexity import evaluate

    device = resolve_device(args.device)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, not {args.seqlen}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1, not {args.max_samples}")
    try:
        result = evaluate(
            args.model,
            args.text,
            args.seqlen,
            device,
            resolve_dtype(args.dtype, device),
            args.max_samples,
            args.trust_remote_code,
        )
    except Exception as err:  # any failure is one line, never a traceback or partial JSON
        text = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"cannot evaluate {args.model}: {text}") from err
    print(json.dumps(result))
    return 0
