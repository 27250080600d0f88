"""Perplexity after quantization: FP16, RTN, plain GPTQ, each refinement and the default.

No download: a Llama-style model is trained on Python standard-library source (held-out
stdlib files are the evaluation text), then quantized in this process with the engine on
the chosen device, once per variant, setting and calibration seed. Reports perplexity, the
fraction of RTN's gap to FP16 that each variant closes (mean and range over seeds) and
quantization seconds. Run: python bench/quality.py --device cuda --seeds 0,1,2 --out-dir DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.demo.models import build_demo_model
from gptq_worker.eval.perplexity import perplexity, text_ids
from gptq_worker.pipeline.run import load_model, quantize, quantize_model

SETTINGS = [  # name, the format's settings
    ("w4 g128 sym", {"bits": 4, "group_size": 128, "sym": True}),
    ("w4 g128 asym", {"bits": 4, "group_size": 128, "sym": False}),
    ("w3 g128 asym", {"bits": 3, "group_size": 128, "sym": False}),
    ("w4 per-channel", {"bits": 4, "group_size": -1, "sym": True}),
]
PLAIN = {"desc_act": False, "static_groups": False, "mse": 0.0, "gptaq": False}
VARIANTS = [  # name, engine settings on top of the format's (None: the engine's defaults)
    ("rtn", {**PLAIN, "method": "rtn"}),
    ("gptq", PLAIN),
    ("+mse 2.4", {**PLAIN, "mse": 2.4}),
    ("+act-order static", {**PLAIN, "desc_act": True, "static_groups": True}),
    ("+act-order real", {**PLAIN, "desc_act": True}),  # permuted g_idx: built-in runtime only
    ("act-real+gptaq", {**PLAIN, "desc_act": True, "gptaq": True}),
    ("+gptaq 0.25", {**PLAIN, "gptaq": True}),
    ("act-static+mse", {**PLAIN, "desc_act": True, "static_groups": True, "mse": 2.4}),
    (
        "act-static+mse+gptaq",
        {**PLAIN, "desc_act": True, "static_groups": True, "mse": 2.4, "gptaq": True},
    ),
    ("default", None),
]


PRECISIONS = [  # name, WorkerConfig fields
    ("tensor-core, batch 8", {"hessian_precision": "tensor-core", "batch_size": 8}),
    ("fp32, batch 8", {"hessian_precision": "fp32", "batch_size": 8}),
    ("fp32, batch 1", {"hessian_precision": "fp32", "batch_size": 1}),  # the plain path
]
PRECISION_SETTINGS = [
    ("w4 g128", {"bits": 4, "group_size": 128, **PLAIN}),
    ("w3 g128", {"bits": 3, "group_size": 128, **PLAIN}),
    ("w3 g128 act-order", {"bits": 3, "group_size": 128, **PLAIN, "desc_act": True}),
]


def compare_precisions(args, paths, ppl, seeds: list[int]) -> None:
    """GPTQ perplexity per Hessian precision and batch size, over calibration seeds."""
    fp16 = ppl(paths["model"])
    print(json.dumps({"variant": "fp16", "perplexity": round(fp16, 4)}), flush=True)
    table: dict[tuple[str, str], list[float]] = {}
    for setting, quant in PRECISION_SETTINGS:
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
    for setting, _ in PRECISION_SETTINGS:
        cells = []
        for precision, _ in PRECISIONS:
            v = table[(setting, precision)]
            cells.append(f"{sum(v) / len(v):8.3f} ({min(v):.2f}..{max(v):.2f})")
        print(f"{setting:20s} " + " ".join(f"{c:>26s}" for c in cells))


def compare_variants(args, paths, seeds: list[int]) -> tuple[list[dict], str]:
    """Every variant at every setting and seed, in this process (no checkpoint written):
    the model's weights are reset between runs and perplexity is taken in memory."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(str(paths["model"]), dtype, False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    eval_ids = text_ids(str(paths["eval"]), tokenizer)
    # the calibration text, tokenized once (the engine's windows are the same)
    calib = Path(args.workdir) / "calibration-ids.jsonl"
    ids = tokenizer(paths["calibration"].read_text(), add_special_tokens=False).input_ids
    calib.write_text(json.dumps({"input_ids": ids}) + "\n")

    def ppl() -> float:
        model.to(device)
        value, _ = perplexity(model, eval_ids, args.eval_seqlen, device, args.eval_windows)
        model.to("cpu")
        return value

    rows = [{"setting": "-", "variant": "fp16", "seed": None, "perplexity": ppl(), "seconds": 0}]
    print(json.dumps(rows[-1]), flush=True)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "rows.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    chosen = set(args.only.split(",")) if args.only else None
    for setting, fmt in SETTINGS:
        for variant, engine in VARIANTS:
            if chosen is not None and variant not in chosen:
                continue
            run_seeds = seeds[:1] if variant == "rtn" else seeds  # RTN sees no calibration
            for seed in run_seeds:
                model.load_state_dict(original)
                quant = QuantizeConfig(**fmt, **(engine or {}))
                work = Path(args.workdir) / "run"
                shutil.rmtree(work, ignore_errors=True)
                cfg = WorkerConfig(
                    model=str(paths["model"]),
                    output=str(Path(args.workdir) / "unused"),
                    device=args.device,
                    quantization=quant,
                    calibration=CalibrationConfig(
                        dataset=str(calib), nsamples=args.nsamples, seqlen=args.seqlen, seed=seed
                    ),
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.monotonic()
                _, progress, _ = quantize_model(model, tokenizer, cfg, device, work, False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.monotonic() - t
                progress.close()
                row = {
                    "setting": setting,
                    "variant": variant,
                    "seed": seed,
                    "perplexity": ppl(),
                    "seconds": round(seconds, 3),
                    "quantization": quant.model_dump(
                        mode="json",
                        include={
                            "desc_act",
                            "static_groups",
                            "mse",
                            "gptaq",
                            "gptaq_alpha",
                            "method",
                        },
                    ),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out_dir:  # as they come: a run cut short still leaves its rows
                    with open(Path(args.out_dir) / "rows.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
    return rows, summarize(rows, seeds)


def summarize(rows: list[dict], seeds: list[int]) -> str:
    fp16 = rows[0]["perplexity"]
    lines = [
        f"FP16 perplexity {fp16:.4f}; calibration seeds {seeds}; gap closed = "
        "(RTN - variant) / (RTN - FP16), per seed; mean (min..max) over seeds",
        "",
        f"{'setting':16s} {'variant':22s} {'ppl mean':>9s} {'ppl range':>17s} "
        f"{'gap closed':>11s} {'range':>15s} {'seconds':>8s}",
    ]
    for setting, _ in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        rtn = next((r["perplexity"] for r in mine if r["variant"] == "rtn"), None)
        for variant, _ in VARIANTS:
            vals = [r for r in mine if r["variant"] == variant]
            if not vals:
                continue
            p = [r["perplexity"] for r in vals]
            s = [r["seconds"] for r in vals]
            closed = ""
            if rtn is not None and variant != "rtn" and rtn > fp16:
                c = [(rtn - x) / (rtn - fp16) for x in p]
                closed = f"{100 * sum(c) / len(c):10.1f}% {100 * min(c):6.1f}..{100 * max(c):6.1f}%"
            lines.append(
                f"{setting:16s} {variant:22s} {sum(p) / len(p):9.4f} "
                f"{min(p):8.4f}..{max(p):7.4f} {closed:>27s} {sum(s) / len(s):8.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gptq-quality")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--train-chars", type=int, default=30_000_000)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="default: all of eval.txt")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--out-dir", default=None, help="write quality-<date>-<gpu>.txt and .json")
    p.add_argument(
        "--precision-seeds",
        default=None,
        help="instead of the variants: compare Hessian precisions over these calibration "
        "seeds (e.g. 0,1,2), at 4 and 3 bits",
    )
    p.add_argument("--summarize", default=None, help="only print the table of a rows.jsonl")
    args = p.parse_args()
    if args.summarize:
        rows = [json.loads(line) for line in Path(args.summarize).read_text().splitlines()]
        print(summarize(rows, sorted({r["seed"] for r in rows if r["seed"] is not None})))
        return

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
        train_chars=args.train_chars,
    )
    print(f"trained in {time.monotonic() - t0:.1f}s", flush=True)
    device = torch.device(args.device)
    if args.precision_seeds:
        from gptq_worker.eval.perplexity import evaluate

        dtype = torch.float16 if device.type == "cuda" else torch.float32

        def ppl(target: Path) -> float:
            return evaluate(str(target), str(paths["eval"]), args.eval_seqlen, device, dtype,
                            None)["perplexity"]  # fmt: skip

        compare_precisions(args, paths, ppl, [int(x) for x in args.precision_seeds.split(",")])
        return
    seeds = [int(x) for x in args.seeds.split(",")]
    rows, table = compare_variants(args, paths, seeds)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_seqlen": args.eval_seqlen,
        "seeds": seeds,
        "default": QuantizeConfig().model_dump(
            mode="json", include={"desc_act", "static_groups", "mse", "gptaq", "gptaq_alpha"}
        ),
        "command": " ".join(sys.argv),
    }
    print("\n" + table)
    print(json.dumps(meta))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        gpu = "h200" if "H200" in meta["device"] else meta["device"].split()[-1].lower()
        stem = f"quality-{datetime.date.today().isoformat()}-{gpu}"
        (out / f"{stem}.txt").write_text(table + "\n" + json.dumps(meta) + "\n")
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
