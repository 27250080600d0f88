"""The fused GPTQ kernels' configurations timed on an 8B model's layer shapes at each
decode row count: the tensor-core tiles the runtime tunes today (``mm``), the one-row
kernel (``mv``) and the swapped-operand tiles (``mt``: the dequantized weight as the tensor
cores' first operand), each over a grid of tile sizes, K splits, pipelining depths and
warps.

Random 4-bit codes with fp16 scales and integer zero points (group 128), packed as the
engine packs them; 8 distinct layers of each shape (as a forward reads them), timed
inside one CUDA graph (``gptq_triton._graph_time``); every configuration's result is first
compared with the torch reference (``reference_matmul``). Prints, for each shape and row
count, the fastest configuration of each kind and its effective weight bandwidth, and the
sum over an 8B model's 32 layers (the GEMM part of one decode step) for the ``mm``/``mv``
choices against the best of all kinds. One JSON line per timing goes to ``--json``.

GPU only; nothing is pass/fail.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import torch

from gptq_worker.format.pack import pack_qweight
from gptq_worker.kernels import gptq_triton as kernels

# (K, N) of Llama-3-8B's fused q/k/v, o, fused gate/up and down projections
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def layers(k: int, n: int, count: int, bits: int = 4, group: int = 128) -> list:
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 2**bits, (n, k), generator=g)
        qweight = pack_qweight(codes, bits).cuda()
        groups = k // group
        scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half().cuda()
        zeros = torch.randint(0, 2**bits, (groups, n), generator=g).half().cuda()
        g_idx = (torch.arange(k) // group).int().cuda()
        out.append(kernels.PackedWeight(qweight, zeros, scales, g_idx, bits))
    return out


def candidates(rows: int) -> list[tuple]:
    out = []
    if rows == 1:
        out += [("mv", bn, per_sm, 3, 4) for bn in (64, 128) for per_sm in (2, 4, 8)]
    tiles = (16,) if rows <= 16 else (16, 32)
    out += [
        ("mm", bn, per_sm, st, wp, tm, 1)
        for bn, per_sm, st, wp, tm in itertools.product((64, 128), (1, 2, 4), (3,), (4, 8), tiles)
    ]
    out += [
        ("mt", bn, per_sm, st, wp, tm, xp, bk)
        for bn, per_sm, st, wp, tm, xp, bk in itertools.product(
            (64, 128, 256), (1, 2, 4), (3,), (4, 8), tiles, (0, 1), (128, 256)
        )
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,16,32")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sink = open(args.json, "a") if args.json else None  # noqa: SIM115
    rows_list = [int(r) for r in args.rows.split(",")]
    best: dict = {}
    t_start = time.monotonic()
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        group = layers(k, n, args.layers)
        weight_bytes = group[0].qweight.numel() * 4
        for rows in rows_list:
            x = torch.randn((rows, k), device="cuda", dtype=torch.float16)
            ref = kernels.reference_matmul(x, group[0]).float()
            for cand in candidates(rows):
                kind, cfg = cand[0], tuple(cand[1:])
                try:
                    y = kernels.fused_matmul(x, group[0], cfg, kind, fp32=True).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    if err > 5e-3:
                        raise AssertionError(f"differs from the reference: {err:.2e}")
                    calls = [
                        functools.partial(kernels.fused_matmul, x, w, cfg, kind, fp32=True)
                        for w in group
                    ]
                    us = kernels._graph_time(calls) * 1e6
                except Exception as err:  # a configuration that cannot run
                    rec = {"shape": name, "rows": rows, "cand": cand, "error": str(err)[:200]}
                    print(json.dumps(rec), file=sys.stderr)
                    continue
                rec = {"shape": name, "rows": rows, "cand": cand, "us": round(us, 2)}
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                slot = best.setdefault((name, rows), {})
                if kind not in slot or us < slot[kind][1]:
                    slot[kind] = (cand, us)
            for kind, (cand, us) in sorted(best.get((name, rows), {}).items()):
                tbs = weight_bytes / (us * 1e-6) / 1e12
                print(f"{name:8} K={k:5} N={n:5} rows={rows:2}  {kind}  {us:7.1f} us "
                      f"{tbs:4.2f} TB/s  {cand}", flush=True)  # fmt: skip
    print(f"\n# GEMM ms per decode step (32 layers), wall {time.monotonic() - t_start:.0f} s")
    for rows in rows_list:
        today = sum(min(us for kind, (_, us) in best[(s, rows)].items() if kind != "mt")
                    for s in args.shapes.split(","))  # fmt: skip
        every = sum(min(us for _, us in best[(s, rows)].values()) for s in args.shapes.split(","))
        ms_today, ms_every = today * 32 / 1000, every * 32 / 1000
        print(f"rows={rows:2}  mm/mv {ms_today:6.3f} ms   with mt {ms_every:6.3f} ms")


if __name__ == "__main__":
    main()
