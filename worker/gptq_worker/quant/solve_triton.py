"""The GPTQ inner loop over one block of columns as one Triton kernel.

Rows of ``W`` are independent given ``H^-1``: each program owns ``BLOCK_R`` rows of the
block and walks its columns in order, keeping the rows in registers. Per column it
quantizes with that column's scale and zero, divides the error by the pivot and spreads it
over the later columns of the block. The arithmetic is the torch loop's
(:func:`gptq_worker.gptq.solve_block_torch`), step for step: IEEE division (``div_rn``),
round half to even, and no fused multiply-add (``enable_fp_fusion=False``), so both give
the same bits.

``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (the CI equality test does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(
    W_ptr,  # [rows, B] fp32, updated in place (the block's working weights)
    Hinv_ptr,  # [B, B] fp32, upper Cholesky factor of the block
    S_ptr,  # [rows, B] fp32 scale of each column
    Z_ptr,  # [rows, B] fp32 zero of each column
    Q_ptr,  # [rows, B] fp32 out: dequantized weights
    C_ptr,  # [rows, B] fp32 out: codes
    E_ptr,  # [rows, B] fp32 out: errors divided by the pivot
    L_ptr,  # [rows] fp32 out: this block's loss per row (added)
    P_ptr,  # [B, B] fp32, GPTAQ's correction of the block (read only when HAS_P)
    rows,
    cols,
    maxq,
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_P: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, B)
    rmask = r < rows
    cmask = c < cols
    tile = r[:, None] * B + c[None, :]
    mask = rmask[:, None] & cmask[None, :]
    W = tl.load(W_ptr + tile, mask=mask, other=0.0)
    loss = tl.load(L_ptr + r, mask=rmask, other=0.0)
    for i in range(0, cols):
        w = tl.sum(tl.where(c[None, :] == i, W, 0.0), axis=1)
        s = tl.load(S_ptr + r * B + i, mask=rmask, other=1.0)
        z = tl.load(Z_ptr + r * B + i, mask=rmask, other=0.0)
        d = tl.load(Hinv_ptr + i * B + i)
        q = _round_half_even(tl.math.div_rn(w, s)) + z
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        dq = s * (q - z)
        diff = w - dq
        loss += tl.math.div_rn(diff * diff, d * d) * 0.5
        err = tl.math.div_rn(diff, d)
        h = tl.load(Hinv_ptr + i * B + c, mask=(c >= i) & cmask, other=0.0)
        if HAS_P:  # the torch loop's ``err * h - w * p``, in the same order
            p = tl.load(P_ptr + i * B + c, mask=(c >= i) & cmask, other=0.0)
            W = W - (err[:, None] * h[None, :] - w[:, None] * p[None, :])
        else:
            W = W - err[:, None] * h[None, :]
        tl.store(Q_ptr + r * B + i, dq, mask=rmask)
        tl.store(C_ptr + r * B + i, q, mask=rmask)
        tl.store(E_ptr + r * B + i, err, mask=rmask)
    tl.store(L_ptr + r, loss, mask=rmask)


def solve_block_triton(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    maxq: int,
    losses: torch.Tensor,
    P1: torch.Tensor | None = None,
    block_rows: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized, codes, errors) of the block; ``losses`` ``[rows]`` is added to in place.

    ``W1``, ``S``, ``Z`` are ``[rows, b]``, ``Hinv1`` and GPTAQ's ``P1`` (optional) are
    ``[b, b]``, all fp32; ``b`` <= 128.
    """
    rows, b = W1.shape
    B = max(16, triton.next_power_of_2(b))

    def padded(t: torch.Tensor, n: int = rows) -> torch.Tensor:
        out = torch.zeros(n, B, dtype=torch.float32, device=t.device)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    # the kernel reads rows < b of Hinv and P, columns < b (masked): past b, padding only.
    # The usual case (b == B) takes the block's tensors as they are (a copy where strided)
    fit = (lambda t, n=rows: t.contiguous()) if b == B else padded
    W, Sp, Zp = fit(W1), fit(S), fit(Z)
    Hp = fit(Hinv1, B)
    Pp = Hp if P1 is None else fit(P1, B)  # Hp: a placeholder the kernel does not read
    Q, C, E = (torch.empty(rows, B, dtype=torch.float32, device=W1.device) for _ in range(3))
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_block_kernel[grid](
        W, Hp, Sp, Zp, Q, C, E, losses, Pp, rows, b, float(maxq),
        B=B, BLOCK_R=block_rows, HAS_P=P1 is not None, enable_fp_fusion=False,
    )  # fmt: skip
    return Q[:, :b], C[:, :b], E[:, :b]


def warm_up(device: torch.device) -> None:
    """Compile the kernel now, both variants (plain, and with GPTAQ's ``P``: about 2 s each
    on a cold cache), e.g. in a thread during capture."""
    rows, b = 16, 128
    W = torch.zeros(rows, b, device=device)
    H = torch.eye(b, device=device)
    ones = torch.ones(rows, b, device=device)
    for P in (None, torch.zeros(b, b, device=device)):
        solve_block_triton(W.clone(), H, ones, ones, 15, torch.zeros(rows, device=device), P)
    torch.cuda.synchronize(device)
