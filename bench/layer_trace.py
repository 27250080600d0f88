"""Where a layer's wall time goes on the GPU: kernel time by kind against idle time (a diagnostic).

Runs the engine as ``speed.py`` does (random model of a real shape, 128 x 2048 tokens) on
``--layers`` layers and records the GPU's kernels (torch.profiler, CUDA activity only) over
one layer (``--trace-layer``, default 1: the first is warm-up). Prints that layer's wall
seconds, the seconds at least one kernel ran (the union of kernel intervals), the kernels'
total by kind (matrix products, attention, factorisations and triangular solves, the Triton
solve, the rest) and the top kernels. ``--parts`` also times, alone, the Hessian products
whole against the lower triangle of blocks (``hessian.symmetric_blocks``) and the inverse
factor's triangular inverse against the identity against ``gptq.lower_inverse``, at the
widths of the shape, with their differences.
Run: ``python bench/layer_trace.py --shape llama-3-8b [--plain] [--parts]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_anatomy import timed as anatomy_timed
from speed import SHAPES, random_model

KINDS = [  # first match wins
    ("attention", r"flash|fmha|attention|sdpa"),
    ("factor+trsm", r"potrf|trsm|trsv|chol|syrk|getrf|trtri|lauum|potri"),
    ("triton-solve", r"solve_block|_solve"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90|matmul|dot"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6  # microseconds


def timed(fn, reps: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (``layer_anatomy.timed``)."""
    return anatomy_timed(fn, reps)


def parts(shape: dict) -> dict:
    from gptq_worker.quant.gptq import lower_inverse
    from gptq_worker.quant.hessian import Hessian

    out: dict[str, float] = {}
    tokens = 8 * 2048
    for width in sorted({shape["hidden_size"], shape["intermediate_size"]}):
        x = torch.randn(tokens, width, device="cuda", dtype=torch.float16)
        acc = Hessian(width, torch.device("cuda"))
        whole = Hessian(width, torch.device("cuda"))
        whole.blocks = [slice(None)]
        out[f"hessian_{width}_blocks"] = len(acc.blocks)
        out[f"hessian_{width}_whole_s"] = timed(lambda w=whole, x=x: w.add(x))
        out[f"hessian_{width}_blocked_s"] = timed(lambda a=acc, x=x: a.add(x))
        a, w = acc.result(), whole.result()
        out[f"hessian_{width}_blocked_vs_whole_rel"] = ((a - w).norm() / w.norm()).item()
        H = a / 4 + torch.eye(width, device="cuda") * a.diagonal().mean() * 0.01
        del acc, whole, a, w, x
        L = torch.linalg.cholesky(H.flip(0, 1))
        out[f"cholesky_{width}_s"] = timed(lambda H=H: torch.linalg.cholesky_ex(H.flip(0, 1)))

        def eye_solve(L=L, width=width):
            eye = torch.eye(width, device="cuda")
            return torch.linalg.solve_triangular(L, eye, upper=False, out=eye)

        out[f"lower_inverse_{width}_identity_s"] = timed(eye_solve)
        out[f"lower_inverse_{width}_halves_s"] = timed(lambda L=L: lower_inverse(L))
        ref = eye_solve().double()
        out[f"lower_inverse_{width}_halves_vs_identity_rel"] = (
            (lower_inverse(L).double() - ref).norm() / ref.norm()
        ).item()
        # against fp64, on the CPU-free path: the product with L should be the identity
        for name, inv in (("identity", eye_solve()), ("halves", lower_inverse(L))):
            r = (inv.double() @ L.double()) - torch.eye(width, device="cuda", dtype=torch.float64)
            out[f"lower_inverse_{width}_{name}_residual"] = (r.norm() / width**0.5).item()
        del L, H, ref
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-3-8b")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--trace-layer", type=int, default=1)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--parts", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="also cProfile the layer after the traced one (needs --layers >= trace-layer + 2): "
        "the host's time by function",
    )
    p.add_argument(
        "--first-layer",
        action="store_true",
        help="trace and cProfile the first layer instead (from the start of quantize_layers, "
        "after the inputs are captured and the solver compiled), to see what it does that "
        "later layers do not",
    )
    p.add_argument("--workdir", default="/tmp/gptq-trace")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
    from gptq_worker.pipeline.run import quantize_model

    shape = dict(SHAPES[args.shape], num_hidden_layers=args.layers)
    result: dict = {"shape": args.shape, "layers": args.layers, "plain": args.plain}
    result["traced_layer"] = 0 if args.first_layer else args.trace_layer
    if args.parts:
        result["parts"] = parts(shape)
        print(json.dumps(result["parts"]), flush=True)
    config = LlamaConfig(**shape, max_position_embeddings=4096)
    model = random_model(AutoModelForCausalLM, config)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration.jsonl"
    ids = torch.randint(
        0, config.vocab_size, (128, 2048), generator=torch.Generator().manual_seed(0)
    )
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    cfg = WorkerConfig(
        model=args.shape,
        output=str(work / "out"),
        device="cuda",
        progress_file=str(work / "progress.jsonl"),
        quantization=QuantizeConfig(
            bits=4,
            group_size=128,
            **(
                {"desc_act": False, "static_groups": False, "mse": 0.0, "gptaq": False}
                if args.plain
                else {}
            ),
        ),
        calibration=CalibrationConfig(dataset=str(calib), nsamples=128, seqlen=2048),
    )
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    marks: dict[str, float] = {}
    host = cProfile.Profile()

    if args.first_layer:
        import gptq_worker.pipeline.run as run_module

        layers_from = run_module.quantize_layers

        def traced(*a, **k):
            torch.cuda.synchronize()
            prof.start()
            marks["start"] = marks["host_start"] = time.perf_counter()
            host.enable()
            return layers_from(*a, **k)

        run_module.quantize_layers = traced

    def on_layer(i: int) -> None:
        torch.cuda.synchronize()
        if args.first_layer:
            if i == 0:
                host.disable()
                marks["end"] = time.perf_counter()
                marks["host_s"] = marks["end"] - marks["host_start"]
                prof.stop()
            return
        if i == args.trace_layer - 1:
            prof.start()
            marks["start"] = time.perf_counter()
        elif i == args.trace_layer:
            marks["end"] = time.perf_counter()
            prof.stop()
            if args.cprofile:
                marks["host_start"] = time.perf_counter()
                host.enable()
        elif i == args.trace_layer + 1 and args.cprofile:
            host.disable()
            marks["host_s"] = time.perf_counter() - marks["host_start"]

    quantize_model(
        model,
        SimpleNamespace(eos_token_id=None),
        cfg,
        torch.device("cuda"),
        work / f"state-{time.time_ns()}",
        show_progress=False,
        on_layer=on_layer,
    )
    wall = marks["end"] - marks["start"]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = union_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        d = (e.time_range.end - e.time_range.start) / 1e6
        by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + d
        by_name.setdefault(e.name, []).append(d)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]
    result.update(
        {
            "layer_wall_s": round(wall, 4),
            "gpu_busy_s": round(busy, 4),
            "gpu_idle_s": round(wall - busy, 4),
            "kernels": len(kernels),
            "kernel_s_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items())},
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
    )
    for name, ds in top:
        print(f"{sum(ds):8.4f} s {len(ds):6d} x  [{kind_of(name)}] {name[:110]}")
    if "host_s" in marks:
        result["cprofiled_layer_wall_s"] = round(marks["host_s"], 4)
        out = io.StringIO()
        pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(30)
        if args.first_layer:
            pstats.Stats(host, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
