"""The built-in runtime's CPU matmuls on Llama-3-8B's layer shapes: ``QuantLinear`` in
float32 (codes dequantized in every forward, the portable path) against bfloat16 (torch's
int4 CPU kernel, ``QuantLinear.cpu_int4``), beside dense ``F.linear`` in both dtypes.

Random 4-bit codes, group 128, asymmetric, packed as the engine packs them; milliseconds
per call (median of ``--repeats``) at each row count. Prints a table; nothing is
pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gptq_compat.config import CheckpointFormat
from gptq_worker.format.pack import pack_qweight, pack_qzeros
from gptq_worker.serve.model import QuantLinear

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def layer(k: int, n: int, group: int = 128) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(1, 16, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
    fmt = CheckpointFormat.GPTQ
    g_idx = (torch.arange(k) // group).int()
    q = QuantLinear(pack_qweight(codes, 4), pack_qzeros(zeros, 4, fmt), scales, g_idx, None, 4, fmt)
    return q


def ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':8} {'rows':>4} {'packed fp32':>12} {'int4 bf16':>10} "
          f"{'dense fp32':>11} {'dense bf16':>11}  (ms per call)")  # fmt: skip
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        q = layer(k, n)
        assert q.cpu_int4() is not None
        w32 = q.dequantized_weight(torch.float32)
        w16 = w32.to(torch.bfloat16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            xb = x.to(torch.bfloat16)
            calls = [(q, x), (q, xb), (lambda a, w=w32: F.linear(a, w), x),
                     (lambda a, w=w16: F.linear(a, w), xb)]  # fmt: skip
            cols = [ms(lambda f=f, a=a: f(a), args.repeats) for f, a in calls]
            print(f"{name:8} {rows:>4} " + " ".join(f"{c:11.2f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
