"""``gptq-worker quantize``: quantize a model with GPTQ and write a checkpoint."""

from __future__ import annotations

import argparse
import json

from gptq_worker.cli.flags import add_setting_flags, worker_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize",
        help="quantize a model with GPTQ and write a checkpoint",
        description="Every setting can also come from --config FILE (YAML or JSON, the "
        "shape of a QuantizationJob's worker config); flags override the file.",
        argument_default=argparse.SUPPRESS,
    )
    q.add_argument("--config", default=None, help="YAML/JSON file with the same settings")
    q.add_argument("--no-progress-bar", dest="no_progress_bar", action="store_true")
    q.add_argument(
        "--termination-message",
        dest="termination_message",
        default=None,
        help="write a JSON summary (or the error) here, e.g. /dev/termination-log",
    )
    add_setting_flags(q)
    q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gptq_worker.pipeline.run import quantize_and_validate

    cfg = worker_config(args)
    show = not getattr(args, "no_progress_bar", False)
    output, report = quantize_and_validate(cfg, show_progress=show)
    print(f"wrote {output}")
    if getattr(args, "termination_message", None):
        q = cfg.quantization
        shapes = sorted(
            {(m.name.rsplit(".", 1)[-1], m.in_features, m.out_features) for m in report.modules}
        )
        summary = {
            "output": str(output),
            "format": {
                "bits": q.bits,
                "groupSize": q.group_size,
                "descAct": report.config.desc_act,
                "sym": q.sym,
                "checkpointFormat": q.checkpoint_format.value,
                "shapes": [{"name": n, "inFeatures": i, "outFeatures": o} for n, i, o in shapes],
            },
            "kernels": report.loadable_kernels(),
            "checkpointBytes": sum(f.stat().st_size for f in output.glob("*.safetensors")),
        }
        measured = json.loads((output / "quantize_config.json").read_text())["meta"].get(
            "perplexity"
        )
        if measured:
            summary["perplexityBefore"] = measured["before"]
            summary["perplexityAfter"] = measured["after"]
        write_termination_message(args.termination_message, summary)
    return 0


def write_termination_message(path: str, payload: dict) -> None:
    """Kubernetes keeps at most 4096 bytes of a termination message."""
    text = json.dumps(payload, separators=(",", ":"))
    if len(text) > 4000:
        text = json.dumps(
            {k: (str(v)[:3000] if k == "error" else v) for k, v in payload.items()},
            separators=(",", ":"),
        )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
