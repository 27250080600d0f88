"""Perplexity after quantization: FP16 vs RTN vs GPTQ on a small model trained here.

No download: a Llama-style model is trained on Python standard-library source (held-out
stdlib files are the evaluation text), then quantized with the engine on the chosen device.
Prints one JSON line per variant and a table. Run: python bench/quality.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.demo.models import build_demo_model
from gptq_worker.eval.perplexity import evaluate
from gptq_worker.pipeline.run import quantize

VARIANTS = [  # name, settings
    ("rtn w4 g128", {"bits": 4, "group_size": 128, "method": "rtn"}),
    ("gptq w4 g128", {"bits": 4, "group_size": 128}),
    ("gptq w4 g128 act-order", {"bits": 4, "group_size": 128, "desc_act": True}),
    ("rtn w3 g128", {"bits": 3, "group_size": 128, "method": "rtn"}),
    ("gptq w3 g128", {"bits": 3, "group_size": 128}),
    ("gptq w3 g128 act-order", {"bits": 3, "group_size": 128, "desc_act": True}),
    # the fp32 switch: Hessians from fp32 products instead of the tensor cores
    ("gptq w4 g128 fp32-hessian", {"bits": 4, "group_size": 128, "hessian_precision": "fp32"}),
    ("gptq w3 g128 fp32-hessian", {"bits": 3, "group_size": 128, "hessian_precision": "fp32"}),
    (
        "gptq w3 g128 act-order fp32-hessian",
        {"bits": 3, "group_size": 128, "desc_act": True, "hessian_precision": "fp32"},
    ),
    ("rtn w4 per-channel", {"bits": 4, "group_size": -1, "method": "rtn"}),
    ("gptq w4 per-channel", {"bits": 4, "group_size": -1}),
    ("rtn w3 per-channel", {"bits": 3, "group_size": -1, "method": "rtn"}),
    ("gptq w3 per-channel", {"bits": 3, "group_size": -1}),
]


PRECISIONS = [  # name, WorkerConfig fields
    ("tensor-core, batch 8", {"hessian_precision": "tensor-core", "batch_size": 8}),
    ("fp32, batch 8", {"hessian_precision": "fp32", "batch_size": 8}),
    ("fp32, batch 1", {"hessian_precision": "fp32", "batch_size": 1}),  # the plain path
]
SETTINGS = [
    ("w4 g128", {"bits": 4, "group_size": 128}),
    ("w3 g128", {"bits": 3, "group_size": 128}),
    ("w3 g128 act-order", {"bits": 3, "group_size": 128, "desc_act": True}),
]


def compare_precisions(args, paths, ppl, seeds: list[int]) -> None:
    """GPTQ perplexity per Hessian precision and batch size, over calibration seeds.

    On a model this small one calibration draw moves perplexity by more than the
    precision does, so each cell is a mean over seeds.
    """
    fp16 = ppl(paths["model"])
    print(json.dumps({"variant": "fp16", "perplexity": round(fp16, 4)}), flush=True)
    table: dict[tuple[str, str], list[float]] = {}
    for setting, quant in SETTINGS:
        for precision, fields in PRECISIONS:
            for seed in seeds:
                out = Path(args.workdir) / "precision"
                cfg = WorkerConfig(
                    model=str(paths["model"]),
                    output=str(out),
                    device=args.device,
                    overwrite=True,
                    quantization=QuantizeConfig(**quant),
                    calibration=CalibrationConfig(
                        dataset=str(paths["calibration"]), nsamples=128, seqlen=512, seed=seed
                    ),
                    **fields,
                )
                quantize(cfg, show_progress=False)
                value = ppl(out)
                table.setdefault((setting, precision), []).append(value)
                row = {"setting": setting, "precision": precision, "seed": seed}
                print(json.dumps({**row, "perplexity": round(value, 4)}), flush=True)
    print(f"\nfp16 {fp16:.3f}; mean perplexity over seeds {seeds} (min..max)")
    print(f"{'setting':20s} " + " ".join(f"{name:>26s}" for name, _ in PRECISIONS))
    for setting, _ in SETTINGS:
        cells = []
        for precision, _ in PRECISIONS:
            v = table[(setting, precision)]
            cells.append(f"{sum(v) / len(v):8.3f} ({min(v):.2f}..{max(v):.2f})")
        print(f"{setting:20s} " + " ".join(f"{c:>26s}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gptq-quality")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--train-chars", type=int, default=30_000_000)
    p.add_argument("--out", default=None, help="also write the JSON lines here")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument(
        "--precision-seeds",
        default=None,
        help="instead of the variants: compare Hessian precisions over these calibration "
        "seeds (e.g. 0,1,2), at 4 and 3 bits",
    )
    args = p.parse_args()

    work = Path(args.workdir)
    t0 = time.monotonic()
    paths = build_demo_model(
        work / "demo",
        steps=args.steps,
        hidden=args.hidden,
        layers=args.layers,
        vocab_size=args.vocab,
        log_every=250,
        device=args.device,
        batch=32,
        seqlen=256,
    )
    print(f"trained in {time.monotonic() - t0:.1f}s", flush=True)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def ppl(target: Path) -> float:
        return evaluate(str(target), str(paths["eval"]), args.eval_seqlen, device, dtype, None)[
            "perplexity"
        ]

    if args.precision_seeds:
        compare_precisions(args, paths, ppl, [int(x) for x in args.precision_seeds.split(",")])
        return
    rows = [{"variant": "fp16", "perplexity": ppl(paths["model"]), "quantize_s": 0.0}]
    chosen = set(args.only.split(",")) if args.only else None
    for name, settings in VARIANTS:
        if chosen is not None and name not in chosen:
            continue
        settings = dict(settings)
        precision = settings.pop("hessian_precision", "tensor-core")
        out = work / name.replace(" ", "-")
        cfg = WorkerConfig(
            model=str(paths["model"]),
            output=str(out),
            device=args.device,
            overwrite=True,
            hessian_precision=precision,
            quantization=QuantizeConfig(**settings),
            calibration=CalibrationConfig(
                dataset=str(paths["calibration"]), nsamples=128, seqlen=512
            ),
        )
        t = time.monotonic()
        quantize(cfg, show_progress=False)
        rows.append(
            {"variant": name, "perplexity": ppl(out), "quantize_s": round(time.monotonic() - t, 2)}
        )
        print(json.dumps(rows[-1]), flush=True)

    fp16 = rows[0]["perplexity"]
    by_name = {r["variant"]: r["perplexity"] for r in rows}
    print(f"\n{'variant':26s} {'ppl':>10s} {'vs fp16':>9s} {'RTN gap closed':>15s}")
    for r in rows:
        base = r["variant"].replace(" fp32-hessian", "").replace(" act-order", "")
        rtn = by_name.get(base.replace("gptq", "rtn"))
        closed = ""
        if r["variant"].startswith("gptq") and rtn is not None and rtn > fp16:
            closed = f"{(rtn - r['perplexity']) / (rtn - fp16):.0%}"
        print(
            f"{r['variant']:26s} {r['perplexity']:10.3f} {r['perplexity'] - fp16:+9.3f} "
            f"{closed:>15s}"
        )
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "eval_seqlen": args.eval_seqlen,
    }
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in [meta, *rows]) + "\n")
    print(json.dumps(meta), file=sys.stderr)


if __name__ == "__main__":
    main()
