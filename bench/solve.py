"""The GPTQ solve alone: torch column loop against the Triton block kernel, per matrix shape.

Prints seconds per module for the shapes of Llama-3-8B's linear layers (q/k/v stacked,
o, gate/up stacked, down) with a random positive-definite Hessian, and the kernel's time
per 128-column block for several row-tile sizes. Run on a GPU: python bench/solve.py
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from gptq_worker.quant.gptq import gptq_quantize

SHAPES = {  # (rows, columns) of the matrices one solve sees, Llama-3-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-loop", action="store_true", help="also time the Python loop")
    args = p.parse_args()
    from gptq_worker.quant.solve_triton import solve_block_triton

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (rows, cols) in SHAPES.items():
        W = torch.randn(rows, cols, device=dev, generator=g)
        X = torch.randn(8192, cols, device=dev, generator=g)
        H = X.t() @ X / 8192
        row = {"module": name, "rows": rows, "cols": cols}
        for solver in ("triton", "torch") if args.torch_loop else ("triton",):
            for act in (False, True):
                kw = dict(bits=4, group_size=128, sym=True, desc_act=act, solver=solver)
                key = f"{solver}{'_act' if act else ''}_s"
                row[key] = round(timed(partial(gptq_quantize, W, H, **kw), 2), 4)
        scales = torch.full((1, rows), 0.05, device=dev)
        zeros = torch.full((1, rows), 8.0, device=dev)
        groups = torch.zeros(128, dtype=torch.int64, device=dev)
        U = torch.linalg.cholesky(torch.linalg.inv(H[:128, :128]), upper=True).contiguous()
        Q, C, E = (torch.empty(rows, 128, device=dev) for _ in range(3))
        for block_rows in (8, 16, 32, 64):
            losses = torch.zeros(rows, device=dev)
            run = partial(
                solve_block_triton, W[:, :128], U, scales, zeros, groups, 15, losses, Q, C, E,
                block_rows=block_rows,
            )  # fmt: skip
            row[f"block_ms_r{block_rows}"] = round(1000 * timed(run), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
