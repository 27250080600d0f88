"""The GPTQ inner loop over one block of columns as one Triton kernel.

Rows of ``W`` are independent given ``H^-1``: each program owns ``BLOCK_R`` rows of the
block and walks its columns in order, keeping the rows in registers. Per column it
quantizes with that column's scale and zero, divides the error by the pivot and spreads it
over the later columns of the block. The arithmetic is the torch loop's
(:func:`gptq_worker.quant.gptq.solve_block_torch`), step for step: IEEE division
(``div_rn``), round half to even, and no fused multiply-add (``enable_fp_fusion=False``),
so both give the same bits.

The kernel reads and writes the solve's own matrices through their row strides (the
block's columns of ``W``, ``Q`` and the codes, the block's rows of ``H^-1``'s factor and
GPTAQ's correction) and each column's scale and zero from the per-group tables, so a block
costs one launch and no copies: on an H200 the copies and padding around each launch had
cost more host time than the kernel ran (bench/README.md).

``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (the CI equality test does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP16_TINY = tl.constexpr(torch.finfo(torch.float16).tiny)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(
    W_ptr, sw,  # [rows, cols] fp32, the block's working weights (read only), row stride
    H_ptr, sh,  # [cols, cols] fp32, the block of H^-1's upper Cholesky factor, row stride
    S_ptr,  # [groups, rows] fp32 scale of each group
    Z_ptr,  # [groups, rows] fp32 zero of each group
    G_ptr,  # [cols] int64, the group of each column
    Q_ptr, sq,  # [rows, cols] fp32 out: dequantized weights
    C_ptr, sc,  # [rows, cols] fp32 out: codes
    E_ptr, se,  # [rows, cols] fp32 out: errors divided by the pivot
    V_ptr, sv,  # [rows, cols] fp32 out: each column just before it was quantized (HAS_P)
    P_ptr, sp,  # [cols, cols] fp32, GPTAQ's correction of the block (read only when HAS_P)
    L_ptr,  # [rows] fp32 out: this block's loss per row (added)
    rows,
    cols,
    maxq,
    g0,  # FIND: the group of the block's first column
    min_zero,  # FIND: the smallest zero point (1 for v1 asymmetric checkpoints)
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_P: tl.constexpr,
    FIND: tl.constexpr,  # the block's groups' scales and zeros from its columns first
    GS: tl.constexpr,  # FIND: the group size, dividing the block
    SYM: tl.constexpr,  # FIND: symmetric
):  # fmt: skip
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, B)
    rmask = r < rows
    cmask = c < cols
    r64 = r.to(tl.int64)  # row offsets of the largest matrices pass 2^31 elements
    mask = rmask[:, None] & cmask[None, :]
    W = tl.load(W_ptr + r64[:, None] * sw + c[None, :], mask=mask, other=0.0)
    loss = tl.load(L_ptr + r, mask=rmask, other=0.0)
    if FIND:  # min-max parameters, as gptq.find_params computes them (no grid search)
        for k in tl.static_range(B // GS):
            here = (c >= k * GS) & (c < (k + 1) * GS) & cmask
            xmin = tl.minimum(tl.min(tl.where(here[None, :], W, float("inf")), axis=1), 0.0)
            xmax = tl.maximum(tl.max(tl.where(here[None, :], W, float("-inf")), axis=1), 0.0)
            if SYM:
                xmax = tl.maximum(tl.abs(xmin), xmax)
                xmin = tl.where(xmin < 0, -xmax, xmin)
            flat = (xmin == 0) & (xmax == 0)
            xmin = tl.where(flat, -1.0, xmin)
            xmax = tl.where(flat, 1.0, xmax)
            scale = tl.maximum(tl.math.div_rn(xmax - xmin, maxq), FP16_TINY)
            scale = scale.to(tl.float16).to(tl.float32)  # round to nearest even, as .half()
            if SYM:
                zero = tl.zeros_like(scale) + (maxq + 1.0) * 0.5
            else:
                zero = _round_half_even(tl.math.div_rn(-xmin, scale))
                zero = tl.minimum(tl.maximum(zero, min_zero), maxq)
            there = rmask & (k * GS < cols)
            tl.store(S_ptr + (g0 + k) * rows + r, scale, mask=there)
            tl.store(Z_ptr + (g0 + k) * rows + r, zero, mask=there)
        tl.debug_barrier()  # the column loop reads them back from the tables
    for i in range(0, cols):
        w = tl.sum(tl.where(c[None, :] == i, W, 0.0), axis=1)
        g = tl.load(G_ptr + i)
        s = tl.load(S_ptr + g * rows + r, mask=rmask, other=1.0)
        z = tl.load(Z_ptr + g * rows + r, mask=rmask, other=0.0)
        d = tl.load(H_ptr + i * sh + i)
        q = _round_half_even(tl.math.div_rn(w, s)) + z
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        dq = s * (q - z)
        diff = w - dq
        loss += tl.math.div_rn(diff * diff, d * d) * 0.5
        err = tl.math.div_rn(diff, d)
        h = tl.load(H_ptr + i * sh + c, mask=(c >= i) & cmask, other=0.0)
        if HAS_P:  # the torch loop's ``err * h - w * p``, in the same order
            p = tl.load(P_ptr + i * sp + c, mask=(c >= i) & cmask, other=0.0)
            W = W - (err[:, None] * h[None, :] - w[:, None] * p[None, :])
            tl.store(V_ptr + r64 * sv + i, w, mask=rmask)
        else:
            W = W - err[:, None] * h[None, :]
        tl.store(Q_ptr + r64 * sq + i, dq, mask=rmask)
        tl.store(C_ptr + r64 * sc + i, q, mask=rmask)
        tl.store(E_ptr + r64 * se + i, err, mask=rmask)
    tl.store(L_ptr + r, loss, mask=rmask)


def solve_block_triton(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    groups: torch.Tensor,
    maxq: int,
    losses: torch.Tensor,
    Q1: torch.Tensor,
    C1: torch.Tensor,
    E1: torch.Tensor,
    V1: torch.Tensor | None = None,
    P1: torch.Tensor | None = None,
    find: tuple[int, int, int, bool, int] | None = None,
    block_rows: int = 8,
) -> None:
    """One block of the solve, in one launch; the interface of
    :func:`gptq_worker.quant.gptq.solve_block_torch`.

    ``W1``, ``Q1``, ``C1``, ``E1``, ``V1`` are ``[rows, b]``, ``Hinv1`` and ``P1`` ``[b, b]``,
    each with unit column stride (views into larger matrices are fine); ``scales`` and
    ``zeros`` ``[groups, rows]`` contiguous, ``groups`` ``[b]`` int64; all fp32 but
    ``groups``; ``b`` <= 128. ``block_rows``: rows per program. 8 was the faster on an H200
    for Llama-3-8B's q/k/v, o and down (0.19 against 0.21 ms a block at 4096 rows with 16),
    16 for gate/up (0.56 against 0.61 ms at 28672 rows), 8 in all per layer
    (bench/solve.py); one size, so one compile per variant at start-up. ``find``
    (``(first group, group size, bits, sym, min_zero)``, the group size dividing ``b``): the
    min-max scales and zeros of the block's groups are found from ``W1`` first and written
    to the tables, as :func:`gptq_worker.quant.gptq.find_params` would.
    """
    rows, b = W1.shape
    mats = (W1, Hinv1, Q1, C1, E1) + ((V1, P1) if P1 is not None else ())
    tables = scales.is_contiguous() and zeros.is_contiguous()
    if any(t.stride(1) != 1 for t in mats) or not tables:
        raise ValueError("solve_block_triton needs unit column strides and contiguous tables")
    V1, P1 = (E1, Hinv1) if P1 is None else (V1, P1)  # placeholders the kernel does not read
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_block_kernel[grid](
        W1, W1.stride(0), Hinv1, Hinv1.stride(0), scales, zeros, groups,
        Q1, Q1.stride(0), C1, C1.stride(0), E1, E1.stride(0), V1, V1.stride(0),
        P1, P1.stride(0), losses, rows, b, float(maxq),
        0 if find is None else find[0], 0.0 if find is None else float(find[4]),
        B=max(16, triton.next_power_of_2(b)), BLOCK_R=block_rows, HAS_P=P1 is not Hinv1,
        FIND=find is not None, GS=16 if find is None else find[1],
        SYM=find is not None and find[3], enable_fp_fusion=False,
    )  # fmt: skip


def warm_up(device: torch.device, find: tuple[int, bool, bool] | None = None) -> None:
    """Compile the kernel now, both variants (plain, and with GPTAQ's ``P``: about 2 s each
    on a cold cache), e.g. in a thread during capture; ``find`` (``(group size, sym,
    gptaq)``, a run whose groups are found block by block): that variant too. The shapes
    have the alignment of a real model's (strides and pointers multiples of 16), which
    Triton specializes on."""
    rows, b, n = 16, 128, 256
    W = torch.zeros(rows, n, device=device)
    H = torch.eye(n, device=device)
    groups = torch.arange(n, device=device) // (n if find is None else find[0])
    tables = [torch.ones(len(groups), rows, device=device) for _ in range(2)]
    out = [torch.empty(rows, n, device=device) for _ in range(4)]
    variants = [(False, None), (True, None)]
    if find is not None:
        variants.append((find[2], (b // find[0], find[0], 4, find[1], 0)))
    for gptaq, how in variants:
        P = torch.zeros(b, n, device=device) if gptaq else None
        solve_block_triton(
            W[:, b:], H[b:, b:], *tables, groups[b:], 15, torch.zeros(rows, device=device),
            out[0][:, b:], out[1][:, b:], out[2][:, :b], out[3][:, :b],
            None if P is None else P[:, :b], how,
        )  # fmt: skip
    torch.cuda.synchronize(device)
