"""``gptq-worker``: quantize, validate, evaluate and serve GPTQ checkpoints.

Exit codes: 0 success, 1 the checkpoint or run failed a check, 2 bad input (arguments,
config, model, calibration data, output path).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

from pydantic import ValidationError

from gptq_worker import __version__
from gptq_worker.config import WorkerConfig, load_config_file

_TOP = (
    "model",
    "output",
    "device",
    "dtype",
    "batch_size",
    "hessian_precision",
    "max_shard_size",
    "trust_remote_code",
    "progress_file",
    "overwrite",
)
_QUANT = (
    "bits",
    "group_size",
    "desc_act",
    "sym",
    "static_groups",
    "damp_percent",
    "damp_auto_increment",
    "true_sequential",
    "mse",
    "checkpoint_format",
    "lm_head",
    "dynamic",
    "method",
)
_CALIB = {
    "calibration": "dataset",
    "nsamples": "nsamples",
    "seqlen": "seqlen",
    "seed": "seed",
    "profile": "profile",
}


class UsageError(ValueError):
    pass


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """camelCase keys of a config file to snake_case (not inside ``dynamic``)."""
    out = {_snake(k): v for k, v in data.items()}
    for section in ("quantization", "calibration"):
        if isinstance(out.get(section), dict):
            out[section] = {
                (k if k == "dynamic" else _snake(k)): v for k, v in out[section].items()
            }
    return out


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Config file (if any) overlaid with the flags given on the command line."""
    given = vars(args)
    data: dict[str, Any] = _normalise(load_config_file(args.config)) if args.config else {}
    data.setdefault("quantization", {})
    data.setdefault("calibration", {})
    for key in _TOP:
        if key in given:
            data[key] = given[key]
    for key in _QUANT:
        if key in given:
            data["quantization"][key] = given[key]
    for flag, key in _CALIB.items():
        if flag in given:
            data["calibration"][key] = given[flag]
    for flag, key in (
        ("eval_text", "text"),
        ("eval_samples", "max_samples"),
        ("eval_seqlen", "seqlen"),
    ):
        if flag in given:
            data.setdefault("evaluation", {})[key] = given[flag]
    if "dynamic" in data["quantization"] and isinstance(data["quantization"]["dynamic"], str):
        try:
            data["quantization"]["dynamic"] = json.loads(data["quantization"]["dynamic"])
        except json.JSONDecodeError as err:
            raise UsageError(f"--dynamic is not valid JSON: {err}") from err
    for key in ("model", "output"):
        if key not in data:
            raise UsageError(f"--{key} is required (on the command line or in --config)")
    return WorkerConfig.model_validate(data)


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"{where}: {e['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptq-worker", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"gptq-worker {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a model with GPTQ and write a checkpoint",
        argument_default=argparse.SUPPRESS,
    )
    q.add_argument("--config", default=None, help="YAML/JSON file with the same settings")
    q.add_argument("--model", help="local model directory or Hugging Face id")
    q.add_argument("--output", help="directory for the checkpoint (written atomically)")
    q.add_argument("--bits", type=int, choices=(2, 3, 4, 8))
    q.add_argument("--group-size", dest="group_size", type=int, help="-1 = per channel")
    q.add_argument(
        "--desc-act",
        dest="desc_act",
        action=argparse.BooleanOptionalAction,
        help="act-order: quantize columns by decreasing Hessian diagonal",
    )
    q.add_argument("--sym", action=argparse.BooleanOptionalAction)
    q.add_argument("--static-groups", dest="static_groups", action=argparse.BooleanOptionalAction)
    q.add_argument("--damp-percent", dest="damp_percent", type=float)
    q.add_argument("--damp-auto-increment", dest="damp_auto_increment", type=float)
    q.add_argument(
        "--true-sequential", dest="true_sequential", action=argparse.BooleanOptionalAction
    )
    q.add_argument("--mse", type=float, help="norm of the scale grid search (e.g. 2.4); 0 = off")
    q.add_argument("--format", dest="checkpoint_format", choices=("gptq", "gptq_v2"))
    q.add_argument("--lm-head", dest="lm_head", action=argparse.BooleanOptionalAction)
    q.add_argument("--dynamic", help="per-module overrides as JSON (GPTQModel syntax)")
    q.add_argument("--method", choices=("gptq", "rtn"), help="rtn = round-to-nearest baseline")
    q.add_argument("--calibration", help="calibration file/directory or HF dataset name")
    q.add_argument("--profile", choices=("general", "code", "long-context"))
    q.add_argument(
        "--eval-text",
        dest="eval_text",
        help="score perplexity on this text before and after quantization",
    )
    q.add_argument("--eval-samples", dest="eval_samples", type=int)
    q.add_argument("--eval-seqlen", dest="eval_seqlen", type=int)
    q.add_argument("--nsamples", type=int)
    q.add_argument("--seqlen", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    q.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"))
    q.add_argument(
        "--batch-size", dest="batch_size", type=int, help="calibration samples per forward"
    )
    q.add_argument(
        "--hessian-precision",
        dest="hessian_precision",
        choices=("tensor-core", "fp32"),
        help="tensor-core (default, fast) or fp32 products for the Hessians on a GPU",
    )
    q.add_argument("--max-shard-size", dest="max_shard_size")
    q.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    q.add_argument(
        "--progress-file",
        dest="progress_file",
        help="append JSON-lines progress events here ('-' = stdout)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    q.add_argument("--no-progress-bar", dest="no_progress_bar", action="store_true")
    q.add_argument(
        "--termination-message",
        dest="termination_message",
        default=None,
        help="write a JSON summary (or the error) here, e.g. /dev/termination-log",
    )

    v = sub.add_parser("validate", help="check a GPTQ checkpoint and list serving kernels")
    v.add_argument("checkpoint")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", help="perplexity of a model or GPTQ checkpoint on a text file")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-samples", dest="max_samples", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    e.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    sv = sub.add_parser("serve", help="serve a GPTQ checkpoint over an OpenAI-compatible HTTP API")
    sv.add_argument("checkpoint", help="directory of a GPTQ checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    sv.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    sv.add_argument(
        "--served-model-name",
        dest="served_model_name",
        default=None,
        help="the name clients ask for (default: the directory's name)",
    )
    sv.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    sv.add_argument(
        "--max-batch", dest="max_batch", type=int, default=8, help="requests decoded together"
    )
    sv.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int,
        default=64,
        help="requests that may wait for a batch; more are refused with 429",
    )
    sv.add_argument(
        "--shutdown-grace",
        dest="grace",
        type=float,
        default=30.0,
        help="seconds to finish accepted requests after SIGTERM",
    )
    sv.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")

    s = sub.add_parser("quickstart", help="train a small model offline, quantize, check, compare")
    s.add_argument("--workdir", default="./gptq-quickstart", help="where models are written")
    s.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    s.add_argument("--group-size", dest="group_size", type=int, default=128)
    s.add_argument("--train-steps", dest="train_steps", type=int, default=300)
    return p


def _quickstart(args: argparse.Namespace) -> int:
    from gptq_worker.quickstart import run_quickstart

    run_quickstart(args.workdir, args.bits, args.group_size, args.train_steps)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gptq_worker.server import serve

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, not {args.port}")
    return serve(
        args.checkpoint,
        name=args.served_model_name,
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        grace=args.grace,
        trust_remote_code=args.trust_remote_code,
    )


def _quantize(args: argparse.Namespace) -> int:
    from gptq_worker.run import quantize
    from gptq_worker.validate import validate_checkpoint

    cfg = worker_config(args)
    output = quantize(cfg, show_progress=not getattr(args, "no_progress_bar", False))
    print(f"wrote {output}")
    if getattr(args, "termination_message", None):
        q = cfg.quantization
        summary = {
            "output": str(output),
            "format": {
                "bits": q.bits,
                "groupSize": q.group_size,
                "descAct": q.desc_act,
                "sym": q.sym,
                "checkpointFormat": q.checkpoint_format.value,
            },
            "kernels": validate_checkpoint(output).loadable_kernels(),
            "checkpointBytes": sum(f.stat().st_size for f in output.glob("*.safetensors")),
        }
        measured = json.loads((output / "quantize_config.json").read_text())["meta"].get(
            "perplexity"
        )
        if measured:
            summary["perplexityBefore"] = measured["before"]
            summary["perplexityAfter"] = measured["after"]
        _write_termination_message(args.termination_message, summary)
    return 0


def _write_termination_message(path: str, payload: dict) -> None:
    """Kubernetes keeps at most 4096 bytes of a termination message."""
    text = json.dumps(payload, separators=(",", ":"))
    if len(text) > 4000:
        text = json.dumps(
            {k: (str(v)[:3000] if k == "error" else v) for k, v in payload.items()},
            separators=(",", ":"),
        )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _validate(args: argparse.Namespace) -> int:
    from gptq_worker.kernels import sm_text
    from gptq_worker.validate import validate_checkpoint

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
    if report.verdicts:
        print("serving kernels:")
        for v in report.verdicts:
            mark = "yes" if v.loads else "no "
            why = "" if v.loads else ": " + "; ".join(v.reasons)
            print(f"  {mark} {v.kernel.name:20s} [{sm_text(v.kernel)}]{why}")
    return 1 if report.errors else 0


def _eval(args: argparse.Namespace) -> int:
    from gptq_worker.evaluate import evaluate
    from gptq_worker.run import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    result = evaluate(
        args.model,
        args.text,
        args.seqlen,
        device,
        resolve_dtype(args.dtype, device),
        args.max_samples,
        args.trust_remote_code,
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from gptq_worker.arch import UnsupportedModel
    from gptq_worker.calibration import CalibrationError
    from gptq_worker.run import RunError

    message = None
    handlers = {
        "quantize": _quantize,
        "validate": _validate,
        "eval": _eval,
        "quickstart": _quickstart,
        "serve": _serve,
    }
    try:
        return handlers[args.command](args)
    except ValidationError as err:
        message = _format_validation(err)
    except (UsageError, RunError, CalibrationError, UnsupportedModel) as err:
        message = str(err)
    except ValueError as err:  # shape and settings checks raised before any work is written
        message = str(err)
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "termination_message", None):
        _write_termination_message(args.termination_message, {"error": message})
    return 2


if __name__ == "__main__":
    sys.exit(main())
