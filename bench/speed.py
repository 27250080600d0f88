"""Engine speed and memory on a randomly initialised model of a real shape.

Timing does not depend on trained weights. Calibration: random token ids, nsamples x seqlen
(default 128 x 2048). Prints per-layer seconds, total seconds and peak GPU memory.
Run: GPTQ_WORKER_PROFILE=1 python bench/speed.py --shape llama-3.2-1b [--desc-act] [--layers N]
(the variable adds the per-phase split: forward, hessian, solve, pack, move, save; it
synchronises the GPU at phase boundaries, so leave it out for the headline time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.pipeline.run import quantize_model

SHAPES = {  # transformers LlamaConfig fields of the public models
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def random_model(auto, config):
    """A model of ``config``'s shape with random fp16 weights, built in seconds.

    transformers' own initialisation takes minutes for 8B on a CPU; timing does not depend
    on the values, so matrices get slices of one random buffer and norms get ones.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = auto.from_config(config, dtype=torch.float16).eval()
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 26, generator=g) * 0.02).half()
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            done = 0
            while done < flat.numel():
                n = min(flat.numel() - done, pool.numel() - offset)
                flat[done : done + n] = pool[offset : offset + n]
                done += n
                offset = (offset + n) % (pool.numel() - 1) + 1  # shift so slices differ
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=None, help="quantize only the first N layers")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true", help="with --plain: act-order on")
    p.add_argument(
        "--plain",
        action="store_true",
        help="the paper's GPTQ (no act-order, static groups, mse or GPTAQ); default: the "
        "engine's default configuration given only --bits and --group-size",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hessian-precision", choices=("tensor-core", "fp32"), default="tensor-core")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default="/tmp/gptq-speed")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(4096, args.seqlen))
    t = time.monotonic()
    model = random_model(AutoModelForCausalLM, config)
    print(
        f"built {args.shape} ({shape['num_hidden_layers']} layers) in {time.monotonic() - t:.1f}s",
        flush=True,
    )

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration.jsonl"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    cfg = WorkerConfig(
        model=args.shape,
        output=str(work / "out"),
        device=args.device,
        batch_size=args.batch_size,
        hessian_precision=args.hessian_precision,
        progress_file=str(work / "progress.jsonl"),
        quantization=QuantizeConfig(
            bits=args.bits,
            group_size=args.group_size,
            **(
                {"desc_act": args.desc_act, "static_groups": False, "mse": 0.0, "gptaq": False}
                if args.plain
                else {}
            ),
        ),
        calibration=CalibrationConfig(
            dataset=str(calib), nsamples=args.nsamples, seqlen=args.seqlen
        ),
    )
    (work / "progress.jsonl").unlink(missing_ok=True)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.monotonic()
    _packed, progress, _ = quantize_model(
        model,
        SimpleNamespace(eos_token_id=None),
        cfg,
        device,
        work / f"state-{time.time_ns()}",
        show_progress=False,
    )
    if cuda:
        torch.cuda.synchronize()
    total = time.monotonic() - t
    progress.close()
    events = [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()]
    layer_times = []
    phases: dict[str, float] = {}
    prev = next(e for e in events if e["event"] == "start")["time"]
    for e in events:
        if e["event"] == "layer":
            layer_times.append(round(e["time"] - prev, 3))
            prev = e["time"]
            for k, v in e.get("phases_s", {}).items():
                phases[k] = round(phases.get(k, 0.0) + v, 3)
    if "hessian" in phases:  # hooks run inside the partial forward passes
        phases["forward"] = round(
            phases.get("forward", 0.0) + phases.pop("forward+hessian") - phases["hessian"], 3
        )
    result = {
        "shape": args.shape,
        "layers": shape["num_hidden_layers"],
        "tokens": f"{args.nsamples}x{args.seqlen}",
        "bits": args.bits,
        "group_size": args.group_size,
        "quantization": cfg.quantization.model_dump(
            mode="json", include={"desc_act", "static_groups", "mse", "gptaq", "gptaq_alpha"}
        ),
        "batch_size": args.batch_size,
        "total_s": round(total, 2),
        "s_per_layer_median": sorted(layer_times)[len(layer_times) // 2],
        "layer_s": layer_times,  # the first includes capturing the calibration inputs
        "phases_s": phases,
        "hessian_precision": args.hessian_precision,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
