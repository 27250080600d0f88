"""Ways to compute ``X^T X`` for fp16/bf16 activations on a GPU: error against fp64, time.

One 16384-token batch of activation-like inputs (16 outlier channels at 30x) per feature
size. Variants: one tensor-core GEMM into fp32, the same without reduced-precision
reductions, tensor-core GEMMs over 2048- and 512-token chunks summed in fp32, TF32 and
fp32 products, and an fp16 result. Run on a GPU: python bench/hessian_variants.py
"""

from __future__ import annotations

import json
import time

import torch


def timed(fn, *args):
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        out = fn(*args)
    torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / 3


def mm_fp32_out(x):
    return torch.mm(x.t(), x, out_dtype=torch.float32)


def chunked(x, n):
    H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    for c in x.split(n):
        H += torch.mm(c.t(), c, out_dtype=torch.float32)
    return H


def float_mm(xf):
    return xf.t() @ xf


def half_out(x):
    return torch.mm(x.t(), x).float()


def reduced_precision(allowed: bool) -> None:
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = allowed
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = allowed


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for f in (4096, 14336):
            scale = torch.ones(f, device=dev)
            scale[:16] = 30.0
            x = (torch.randn(16384, f, device=dev, generator=g) * scale).to(dtype)
            ref = x.double().t() @ x.double()
            norm = torch.linalg.norm(ref)
            res: dict = {"dtype": str(dtype).removeprefix("torch."), "features": f}

            def record(name, out_and_time, ref=ref, norm=norm, res=res):
                H, t = out_and_time
                res[name] = [float(torch.linalg.norm(H.double() - ref) / norm), round(t * 1e3, 2)]

            reduced_precision(True)
            record("tensor_core", timed(mm_fp32_out, x))
            reduced_precision(False)
            record("tensor_core_no_reduced_reduction", timed(mm_fp32_out, x))
            record("tensor_core_chunk2048", timed(chunked, x, 2048))
            record("tensor_core_chunk512", timed(chunked, x, 512))
            xf = x.float()
            torch.backends.cuda.matmul.allow_tf32 = True
            record("tf32", timed(float_mm, xf))
            torch.backends.cuda.matmul.allow_tf32 = False
            record("fp32", timed(float_mm, xf))
            record("fp16_result", timed(half_out, x))
            print(json.dumps(res), flush=True)  # each value: [relative error, ms]


if __name__ == "__main__":
    main()
