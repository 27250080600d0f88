"""``gptq-worker quickstart``: the whole engine on one machine, offline, in a few minutes.

Trains a small Llama-style model on Python standard-library source (no download),
quantizes it with GPTQ and with round-to-nearest, validates the checkpoint, and compares
perplexities on held-out text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gptq_worker.config import CalibrationConfig, Method, QuantizeConfig, WorkerConfig
from gptq_worker.demo import build_demo_model
from gptq_worker.evaluate import evaluate
from gptq_worker.kernels import sm_text
from gptq_worker.run import quantize
from gptq_worker.validate import validate_checkpoint


def run_quickstart(
    workdir: str | Path, bits: int = 4, group_size: int = 128, train_steps: int = 300
) -> dict:
    workdir = Path(workdir).expanduser().resolve()
    device = torch.device("cpu")
    started = time.monotonic()
    demo = workdir / "demo"
    if (demo / "model" / "config.json").exists():
        print(f"[1/4] reusing the demo model in {demo / 'model'}")
        paths = {
            "model": demo / "model",
            "calibration": demo / "calibration.txt",
            "eval": demo / "eval.txt",
        }
    else:
        print(f"[1/4] training a small Llama-style model on stdlib text ({train_steps} steps)")
        paths = build_demo_model(demo, steps=train_steps)

    results = {}
    for method in (Method.RTN, Method.GPTQ):
        out = workdir / f"{method.value}-w{bits}g{group_size}"
        print(
            f"[2/4] quantizing with {method.value.upper()} ({bits}-bit, group {group_size}) "
            f"-> {out}"
        )
        cfg = WorkerConfig(
            model=str(paths["model"]),
            output=str(out),
            device="cpu",
            overwrite=True,
            quantization=QuantizeConfig(bits=bits, group_size=group_size, method=method),
            calibration=CalibrationConfig(
                dataset=str(paths["calibration"]), nsamples=128, seqlen=256
            ),
        )
        quantize(cfg, show_progress=True)
        results[method.value] = out

    checkpoint = results["gptq"]
    report = validate_checkpoint(checkpoint)
    print(
        f"[3/4] validate {checkpoint}: {'OK' if not report.errors else 'FAILED'} "
        f"({len(report.modules)} quantized modules)"
    )
    for v in report.verdicts:
        why = "" if v.loads else ": " + "; ".join(v.reasons)
        print(f"      {'yes' if v.loads else 'no '} {v.kernel.name:20s} [{sm_text(v.kernel)}]{why}")

    print("[4/4] perplexity on held-out stdlib files (lower is better)")
    ppl = {}
    for name, target in (
        ("fp16", paths["model"]),
        ("rtn", results["rtn"]),
        ("gptq", results["gptq"]),
    ):
        r = evaluate(str(target), str(paths["eval"]), 256, device, torch.float32, 60)
        ppl[name] = r["perplexity"]
        print(f"      {name:5s} {r['perplexity']:10.3f}  ({r['tokens']} tokens)")
    gap = ppl["rtn"] - ppl["fp16"]
    closed = (ppl["rtn"] - ppl["gptq"]) / gap if gap > 0 else float("nan")
    summary = {
        "perplexity": ppl,
        "gap_closed_by_gptq": round(closed, 3),
        "checkpoint": str(checkpoint),
        "kernels": report.loadable_kernels(),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"GPTQ closes {closed:.0%} of round-to-nearest's perplexity gap to fp16.")
    print(json.dumps(summary))
    return summary
