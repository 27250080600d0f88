"""GPTQ: one-shot second-order weight quantization (Frantar et al., arXiv:2210.17323).

Pure functions on tensors: no I/O, no model knowledge. The driver (``engine.py``)
accumulates Hessians with :func:`accumulate_hessian` and calls :func:`gptq_quantize`
once per Linear weight.

Notation: ``W`` is ``[out, in]``; ``H = 2/n * X^T X`` is ``[in, in]``; ``maxq = 2^bits - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP16_TINY = torch.finfo(torch.float16).tiny


class HessianNotPositiveDefinite(ValueError):
    """Damping reached 100% of the mean diagonal and Cholesky still failed."""


def accumulate_hessian(H: torch.Tensor, nsamples: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running ``H = 2/n * sum x x^T`` (paper, eq. 2).

    ``x`` is ``[batch, ..., in]``; each leading-dim entry counts as one sample, as in the
    reference implementation. ``H`` (``[in, in]`` fp32) is updated in place and returned.
    """
    batch = x.shape[0] if x.dim() > 2 else 1
    x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    total = nsamples + batch
    H.mul_(nsamples / total)
    x = x * math.sqrt(2 / total)
    H.addmm_(x.t(), x)
    return H, total


@dataclass(frozen=True)
class GroupParams:
    """Scale and zero point of one quantization group, per output row."""

    scale: torch.Tensor  # [out] fp32, exactly representable in fp16
    zero: torch.Tensor  # [out] fp32 holding integers in [0, maxq]


def find_params(
    w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0, min_zero: int = 0
) -> GroupParams:
    """Min-max scale and zero for ``w`` (``[out, cols]``), optionally refined by a grid search.

    The range always contains 0. ``sym`` fixes ``zero = (maxq+1)/2``; otherwise
    ``zero = round(-xmin/scale)``, clamped to ``[min_zero, maxq]`` (v1 checkpoints store
    ``zero - 1`` and so need ``min_zero = 1``). ``mse > 0`` shrinks the range over a
    100-point grid and keeps, per row, the candidate with the smallest ``|q - w|^mse``.
    Scales are rounded to fp16 here, so the solve uses exactly what the checkpoint stores.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)  # [out]
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)

    def candidate(shrink: float) -> GroupParams:
        lo, hi = shrink * xmin, shrink * xmax
        scale = ((hi - lo) / maxq).clamp(min=FP16_TINY).half().float()
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale).clamp(min_zero, maxq)
        return GroupParams(scale, zero)

    best = candidate(1.0)
    if mse > 0:
        best_err = _grid_error(w, best, maxq, mse)
        for step in range(1, 80):  # shrink down to 0.21 of the range, as the reference does
            cand = candidate(1 - step / 100)
            err = _grid_error(w, cand, maxq, mse)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = GroupParams(
                torch.where(better, cand.scale, best.scale),
                torch.where(better, cand.zero, best.zero),
            )
    return best


def _grid_error(w: torch.Tensor, p: GroupParams, maxq: int, norm: float) -> torch.Tensor:
    q = dequantize(
        quantize(w, p.scale[:, None], p.zero[:, None], maxq), p.scale[:, None], p.zero[:, None]
    )
    return (q - w).abs_().pow_(norm).sum(dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w/scale) + zero, 0, maxq)`` (as float)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def inverse_hessian_cholesky(
    H: torch.Tensor, damp_percent: float, damp_increment: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (paper, section 4, step 3).

    When Cholesky fails, damping grows by ``damp_increment`` until it succeeds; returns the
    factor and the damping that was used.
    """
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    while damp < 1:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        damp += damp_increment
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with damp_percent {damp:.4f}; the calibration "
        "data may be too small or degenerate for this module"
    )


@dataclass(frozen=True)
class QuantizedWeight:
    """GPTQ's result for one weight matrix, in the original column order."""

    codes: torch.Tensor  # [out, in] int32 in [0, maxq]
    scales: torch.Tensor  # [groups, out] fp32, fp16-exact
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32, group of each input column
    weight: torch.Tensor  # [out, in] fp32, dequantized (what the model computes with)
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_jj^2 / 2 (the solve's objective)
    damp: float  # damping that was used


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    damp_increment: float = 0.0025,
    mse: float = 0.0,
    min_zero: int = 0,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``W`` (``[out, in]``) column by column, compensating with ``H`` (``[in, in]``).

    Implements Algorithm 1 of the paper with lazy batch updates (section 4, step 2):
    within a block each column's error is spread over the block's later columns; the
    block's accumulated error updates the rest of ``W`` once at the end of the block.
    ``H`` is not modified.
    """
    out_features, in_features = W.shape
    if group_size != -1 and in_features % group_size:
        raise ValueError(
            f"in_features {in_features} is not a multiple of group_size {group_size}; use a "
            f"group_size that divides it or -1"
        )
    maxq = 2**bits - 1
    W = W.detach().float().clone()
    H = H.detach().float().clone()

    dead = torch.diag(H) == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = 1 if group_size == -1 else in_features // group_size
    dev = W.device
    scales = torch.zeros(groups, out_features, device=dev)
    zeros = torch.zeros(groups, out_features, device=dev)

    def record(g: int, p: GroupParams) -> GroupParams:
        scales[g], zeros[g] = p.scale, p.zero
        return p

    if group_size == -1:
        params = record(0, find_params(W, bits, sym, mse, min_zero))
    elif static_groups:  # parameters from the unpermuted, not yet updated weights
        static = [
            record(
                g,
                find_params(W[:, g * group_size : (g + 1) * group_size], bits, sym, mse, min_zero),
            )
            for g in range(groups)
        ]

    perm = None
    if desc_act:  # act-order: most salient inputs first (section 4, "act-order")
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv, damp = inverse_hessian_cholesky(H, damp_percent, damp_increment)  # [in, in] upper
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    losses = torch.zeros(out_features, device=dev)

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1:
                if static_groups:
                    params = static[
                        int(perm[col]) // group_size if perm is not None else col // group_size
                    ]
                elif col % group_size == 0:
                    # As the reference does: from W, which carries earlier blocks' updates but
                    # not yet this block's. Measured lower output error at 2-3 bits than the
                    # fully updated weights, whose range the error feedback inflates.
                    params = record(
                        col // group_size,
                        find_params(W[:, col : col + group_size], bits, sym, mse, min_zero),
                    )
            w = W1[:, i]  # [out]
            d = Hinv1[i, i]
            q = quantize(w, params.scale, params.zero, maxq)
            codes[:, col] = q
            Q[:, col] = dequantize(q, params.scale, params.zero)
            losses += (w - Q[:, col]) ** 2 / d**2 / 2
            err = (w - Q[:, col]) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if group_size == -1:
        g_idx = torch.zeros(in_features, dtype=torch.int32, device=dev)
    elif desc_act and not static_groups:
        g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
    else:
        g_idx = (torch.arange(in_features, device=dev) // group_size).to(torch.int32)
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, codes = Q[:, invperm], codes[:, invperm]

    return QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        weight=Q,
        loss=float(losses.sum()),
        damp=damp,
    )


def rtn_quantize(
    W: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    mse: float = 0.0,
    min_zero: int = 0,
    **_: object,
) -> QuantizedWeight:
    """Round-to-nearest: GPTQ with an identity Hessian, i.e. no error compensation."""
    identity = torch.eye(W.shape[1], device=W.device)
    return gptq_quantize(
        W, identity, bits=bits, group_size=group_size, sym=sym, mse=mse, min_zero=min_zero
    )
