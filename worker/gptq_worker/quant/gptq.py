"""GPTQ: one-shot second-order weight quantization (Frantar et al., arXiv:2210.17323).

Pure functions on tensors: no I/O, no model knowledge. The driver
(``pipeline/driver.py``) accumulates Hessians (``hessian.py``) and calls
:func:`gptq_quantize` once per Linear weight (or stack of weights sharing a Hessian).

Notation: ``W`` is ``[out, in]``; ``H = 2/n * X^T X`` is ``[in, in]``; ``maxq = 2^bits - 1``.

It is longer than 400 lines because the solve, its inverse factor and GPTAQ's correction
rows are one algorithm whose pieces share block sizes and numerics.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

FP16_TINY = torch.finfo(torch.float16).tiny
# The solve's panels, in 128-column blocks (gptq_quantize): the columns after a panel are
# updated once per panel, and GPTAQ's correction rows are formed a panel at a time. 1024
# rows keep those fp32 products deep enough to run efficiently (the 8B down_proj's were
# 128 deep per block), at a few percent more arithmetic for the correction (a panel's
# later rows multiply zeros over its earlier columns) and two [out, 1024] buffers
BLOCKS_PER_PANEL = 8


class HessianNotPositiveDefinite(ValueError):
    """Damping reached 100% of the mean diagonal and Cholesky still failed."""


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

    One factorisation and one triangular inverse, not the reference's Cholesky, explicit
    inverse and second Cholesky: with ``J`` the order-reversing permutation and
    ``J Hd J = L L^T`` (lower), ``Hd^-1 = J L^-T L^-1 J = U^T U`` with ``U = J L^-1 J``,
    which is upper triangular with a positive diagonal, so it is *the* Cholesky factor of
    ``Hd^-1`` (unique), computed in about half the arithmetic (cuSOLVER's ``potrf`` and
    one ``trsm`` against ``potrf``, two ``trsm`` for the inverse and a second ``potrf``)
    and without forming ``Hd^-1``, whose second factorisation loses accuracy.
    """
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    while damp < 1:
        # in place where torch allows: [in, in] buffers are 0.8 GB each for down_proj of an
        # 8B model, 3.3 GB for 70B
        L = H.flip(0, 1)  # a copy: J Hd J, damped, then its lower factor
        L.diagonal().add_(damp * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=L.device)
        L, info = torch.linalg.cholesky_ex(L, out=(L, info))
        # the inverse is formed before the factorisation's status is read: one wait for the
        # GPU instead of two (a failed factor's inverse is wasted work, and rare)
        Linv = lower_inverse(L)
        del L
        U = Linv.flip(0, 1)
        del Linv
        if bool((info == 0) & torch.isfinite(U).all()):
            return U, damp
        del U
        damp += damp_increment
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with damp_percent {damp:.4f}; the calibration "
        "data may be too small or degenerate for this module"
    )


def lower_inverse(L: torch.Tensor, leaf: int = 2048) -> torch.Tensor:
    """``L^-1`` for lower triangular ``L`` (``[n, n]``), by halves: with
    ``L = [[A, 0], [B, C]]``, ``L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, the corner from two
    triangular solves with ``n/2`` right-hand sides. That is ``n^3 / 3`` operations in all,
    against ``n^3`` for one triangular solve against the identity (which knows nothing of
    the identity's zeros); blocks up to ``leaf`` wide are solved against the identity."""
    out = torch.zeros_like(L)
    _lower_inverse_into(L, out, leaf)
    return out


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        out.copy_(torch.linalg.solve_triangular(L, eye, upper=False, out=eye))
        return
    k = n // 2 if n < 256 else (n // 2 + 63) // 128 * 128  # a multiple of 128 where it can
    A, B, C = L[:k, :k], L[k:, :k], L[k:, k:]
    _lower_inverse_into(A, out[:k, :k], leaf)
    _lower_inverse_into(C, out[k:, k:], leaf)
    Y = torch.linalg.solve_triangular(A, B, upper=False, left=False)  # Y A = B: B A^-1
    out[k:, :k] = torch.linalg.solve_triangular(C, Y, upper=False).neg_()  # C^-1 B A^-1


@dataclass(frozen=True)
class QuantizedWeight:
    """GPTQ's result for one weight matrix, in the original column order."""

    codes: torch.Tensor  # [out, in] int32 in [0, maxq]
    scales: torch.Tensor  # [groups, out] fp32, fp16-exact
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32, group of each input column
    weight: torch.Tensor  # [out, in] fp32, dequantized (what the model computes with)
    row_losses: torch.Tensor  # [out]: sum over columns of (w - q)^2 / [H^-1]_jj^2 / 2
    damp: float  # damping that was used

    @property
    def loss(self) -> float:
        """The solve's objective, summed over rows."""
        return float(self.row_losses.sum())

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """The result for output rows ``start:stop`` (one module of a fused solve)."""
        return QuantizedWeight(
            codes=self.codes[start:stop],
            scales=self.scales[:, start:stop],
            zeros=self.zeros[:, start:stop],
            g_idx=self.g_idx,
            weight=self.weight[start:stop],
            row_losses=self.row_losses[start:stop],
            damp=self.damp,
        )


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
    solver: str = "auto",
    dXXT: torch.Tensor | None = None,
    gptaq_alpha: float = 0.25,
    split_products: bool = False,
) -> QuantizedWeight:
    """Quantize ``W`` (``[out, in]``) column by column, compensating with ``H`` (``[in, in]``).

    Implements Algorithm 1 of the paper with lazy batch updates (section 4, step 2):
    within a block each column's error is spread over the block's later columns; the
    block's accumulated error updates the rest of ``W`` once at the end of the block.
    ``H`` is not modified. ``solver`` picks the block loop: ``torch`` (a Python loop over
    columns), ``triton`` (one kernel per block, :mod:`gptq_worker.quant.solve_triton`) or
    ``auto`` (Triton on CUDA when it is installed). Both give the same bits.

    ``dXXT`` (``[in, in]``, from :class:`AsymmetricHessian`) turns on GPTAQ's asymmetric
    calibration: ``H`` is then built from the quantized model's inputs ``X~`` and the
    solve minimises ``||Q X~ - W X||`` instead of ``||Q X~ - W X~||``, with the correction
    :func:`gptaq_correction` scaled by ``gptaq_alpha``. ``dXXT = 0`` gives plain GPTQ.

    ``split_products`` computes the products with ``H^-1``'s factor as three TF32
    tensor-core products each (:func:`matmul`) instead of fp32 ones. Off by default: on an
    H200 it made the 8B ``down_proj`` solve slower (0.320 s against 0.300 s) and GPTAQ's
    correction 57x less accurate against fp64 (4.4e-5 against 7.8e-7;
    bench/results/speed-layer-anatomy-llama-3-8b-h200-2026-12-01.txt).
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

    # inputs never seen: their weights cannot matter. masked_fill_, not boolean indexing,
    # which would wait for the GPU to find the indices
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1)
    W.masked_fill_(dead[None, :], 0)
    if dXXT is not None:
        dXXT = dXXT.detach().float().clone()
        dXXT.masked_fill_(dead[None, :], 0)

    groups = 1 if group_size == -1 else in_features // group_size
    dev = W.device
    scales = torch.zeros(groups, out_features, device=dev)
    zeros = torch.zeros(groups, out_features, device=dev)

    def record(g: int, p: GroupParams) -> GroupParams:
        scales[g], zeros[g] = p.scale, p.zero
        return p

    if group_size == -1:
        record(0, find_params(W, bits, sym, mse, min_zero))
    elif static_groups and mse == 0:  # from the unpermuted, not yet updated weights
        # min-max parameters are exact per row, so all groups are found in one call
        p = find_params(
            W.view(out_features, groups, group_size).transpose(0, 1).reshape(-1, group_size),
            bits,
            sym,
            mse,
            min_zero,
        )
        scales.copy_(p.scale.view(groups, out_features))
        zeros.copy_(p.zero.view(groups, out_features))
    elif static_groups:
        for g in range(groups):
            cols = W[:, g * group_size : (g + 1) * group_size]
            record(g, find_params(cols, bits, sym, mse, min_zero))

    perm = None
    if desc_act:  # act-order: most salient inputs first (section 4, "act-order")
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        if dXXT is not None:
            dXXT = dXXT[perm][:, perm]

    Hinv, damp = inverse_hessian_cholesky(H, damp_percent, damp_increment)  # [in, in] upper
    del H
    if split_products:  # the lazy-batch and GPTAQ products as 3xTF32 (matmul); off: fp32
        Hinv = tf32_parts(Hinv)
    # every column is written by the block solver: no need to clear these
    Q = torch.empty_like(W)
    codes = torch.empty_like(W)
    losses = torch.zeros(out_features, device=dev)
    solve_block = _block_solver(solver, W)
    # the group whose parameters each (possibly permuted) column uses
    if group_size == -1:
        column_group = torch.zeros(in_features, dtype=torch.int64, device=dev)
    else:
        order = perm if (perm is not None and static_groups) else torch.arange(in_features)
        column_group = (order.to(dev) // group_size).long()
    # Two levels of lazy updates: the columns are taken in panels of BLOCKS_PER_PANEL
    # blocks. After each block only the rest of its panel is updated; the columns after the
    # panel get the whole panel's updates at once, from its errors gathered in ``E`` (and
    # GPTAQ's pre-quantization columns in ``V``): the same sums, in products 8x deeper
    # (fp32 on CUDA cores, more efficient deep than shallow). Groups found from the updated
    # W (no static groups) must not cross a panel's end, which holds back the panel's
    # updates from later columns until it is done: otherwise panels are single blocks.
    panel = block_size * BLOCKS_PER_PANEL
    if not (static_groups or group_size == -1 or panel % group_size == 0):
        panel = block_size
    E = torch.empty(out_features, panel, device=dev)
    V = torch.empty_like(E) if dXXT is not None else None
    # groups found block by block from the updated W: where they fit in a block and need no
    # grid search, the block solver finds them (one launch on a GPU instead of ~20)
    find_in_block = finds_groups_in_block(group_size, static_groups, mse, block_size)
    find = None

    for s1 in range(0, in_features, panel):
        s2 = min(s1 + panel, in_features)
        # GPTAQ's correction does not depend on W: its rows for the whole panel in one go
        # (gptaq_correction_rows; 59 MB for a panel of the 8B down_proj)
        P_rows = None if dXXT is None else gptaq_correction_rows(dXXT, Hinv, gptaq_alpha, s1, s2)
        for i1 in range(s1, s2, block_size):
            i2 = min(i1 + block_size, s2)
            b = i2 - i1
            if group_size != -1 and not static_groups and not find_in_block:
                # Groups starting in this block take their parameters from W, which carries
                # earlier blocks' updates but not this block's, as the reference does (it
                # reads W at the group's first column, and W is only updated between
                # blocks). Measured lower output error at 2-3 bits than fully updated
                # weights, whose range the error feedback inflates. All of them can be
                # found before the block's loop.
                first = -(-i1 // group_size) * group_size
                starts = list(range(first, i2, group_size))
                if starts:
                    g0 = first // group_size
                    record_groups(
                        W, starts, group_size, bits, sym, mse, min_zero,
                        scales[g0 : g0 + len(starts)], zeros[g0 : g0 + len(starts)],
                    )  # fmt: skip
            blk, rest = slice(i1, i2), slice(i2, s2)  # rest: of the panel
            if find_in_block:  # the groups of this block, found by the block solver from W
                find = (i1 // group_size, group_size, bits, sym, min_zero)
            E1, V1, P1 = E[:, i1 - s1 : i2 - s1], None, None
            if P_rows is not None:
                P1 = P_rows[i1 - s1 : i2 - s1, i1 - s1 :]  # P[i1:i2, i1:]
                V1 = V[:, i1 - s1 : i2 - s1]
            solve_block(
                W[:, blk], _whole(Hinv, blk, blk), scales, zeros, column_group[blk], maxq,
                losses, Q[:, blk], codes[:, blk], E1, V1, None if P1 is None else P1[:, :b],
                find,
            )  # fmt: skip
            if i2 < s2:  # W -= E U[blk, rest] - V P[blk, rest], in place
                _add_product(W[:, rest], E1, _block(Hinv, blk, rest), -1.0)
                if P1 is not None:
                    _add_product(W[:, rest], V1, _parts_like(Hinv, P1[:, b : s2 - i1]), 1.0)
        if s2 < in_features:  # the columns after the panel, from all of its blocks
            done, after = slice(s1, s2), slice(s2, None)
            _add_product(W[:, after], E[:, : s2 - s1], _block(Hinv, done, after), -1.0)
            if P_rows is not None:
                P_after = _parts_like(Hinv, P_rows[:, s2 - s1 :])
                _add_product(W[:, after], V[:, : s2 - s1], P_after, 1.0)
        del P_rows

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
        row_losses=losses,
        damp=damp,
    )


def gptaq_correction(dXXT: torch.Tensor, Hinv: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's ``P = alpha * triu(dXXT U^T, 1) U`` (``[in, in]``; arXiv:2504.02692, section 4).

    ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), as used by the solve.
    When column ``i`` is quantized, the later columns ``j > i`` move by ``w_i * P[i, j]`` on
    top of GPTQ's ``-err_i * U[i, j]``: the part of the asymmetric term ``W dX X~^T H^-1``
    that row ``i`` of the Cholesky factorisation reaches. ``P`` is strictly upper triangular
    (row ``i`` only touches later columns), so quantizing column ``i`` itself is unchanged.
    ``alpha`` (GPTQModel's ``GPTAQConfig.alpha``, 0.25) damps the term.
    """
    P = (dXXT @ Hinv.t()).triu_(diagonal=1) @ Hinv  # in place: one [in, in] buffer fewer
    return P.mul_(alpha)


Factor = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # U, or its two TF32 parts


def tf32_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (fp32) as ``hi + lo``, exactly: ``hi`` keeps the top 10 of the 23 mantissa bits
    (a TF32 value), ``lo = x - hi`` (exact in fp32) the rest, to about 2^-21 relative once
    TF32 rounds it."""
    hi = (x.view(torch.int32) & -8192).view(torch.float32)  # the low 13 bits cleared
    return hi, x - hi


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul(a: torch.Tensor, b: Factor | torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32, or, when ``b`` comes as TF32 parts, as three TF32 tensor-core
    products ``a_hi b_hi + (a_hi b_lo + a_lo b_hi)`` (the 3xTF32 split; ``a_lo b_lo`` is below
    fp32's rounding on paper). Measured on an H200 (bench/layer_anatomy.py) it was neither
    as accurate as fp32 products nor faster for the solve's shapes, so the engine does not
    use it by default (``gptq_quantize(split_products=...)``)."""
    if isinstance(b, torch.Tensor):
        return a @ b
    b_hi, b_lo = b
    a_hi, a_lo = tf32_parts(a)
    with _tf32():
        return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


def _block(U: Factor, rows: slice, cols: slice, transpose: bool = False) -> Factor:
    if isinstance(U, torch.Tensor):
        return U[rows, cols].t() if transpose else U[rows, cols]
    return tuple(u[rows, cols].t() if transpose else u[rows, cols] for u in U)


def _whole(U: Factor, rows: slice, cols: slice) -> torch.Tensor:
    """The block of ``U`` itself (``hi + lo`` is exact)."""
    return U[rows, cols] if isinstance(U, torch.Tensor) else U[0][rows, cols] + U[1][rows, cols]


def gptaq_correction_rows(
    dXXT: torch.Tensor,
    Hinv: Factor,
    alpha: float,
    i1: int,
    i2: int,
    width: int | None = None,
) -> torch.Tensor:
    """Rows ``i1:i2`` of :func:`gptaq_correction`'s ``P``, from column ``i1`` on
    (``[i2 - i1, in - i1]``; the columns before ``i1`` are zero).

    With ``A = triu(dXXT U^T, 1)``, ``A[i, j]`` for ``j > i >= i1`` sums ``dXXT[i, k] U[j, k]``
    over ``k >= j`` only (``U`` is upper triangular), and ``P[i, k] = sum_j A[i, j] U[j, k]``
    over ``i1 <= j <= k``: both products need only the trailing ``[i1:, i1:]`` block of
    ``U``, and only its part on and above the diagonal. So the ``m = in - i1`` columns are
    taken in blocks of ``width`` (default: about a quarter of ``m``, at least 1024): block
    ``J`` of ``A`` multiplies ``dXXT`` from ``J``'s first column on, block ``K`` of ``P`` the
    columns of ``A`` up to ``K``'s last. With 4 blocks that is 5/8 of the two whole
    products' arithmetic; summed over the solve's blocks of rows, ``(5/6) in^3`` operations
    against ``4 in^3`` for the whole ``[in, in]`` product (fp32 on CUDA cores), which is
    never held. ``Hinv`` may come as :func:`tf32_parts` (see :func:`matmul`).
    """
    m = dXXT.shape[1] - i1
    if width is None:
        width = max(1024, -(-m // 4 // 128) * 128)
    edges = [*range(0, m, width), m]
    cols = [slice(i1 + a, i1 + b) for a, b in itertools.pairwise(edges)]
    D = dXXT[i1:i2]
    A = torch.empty(i2 - i1, m, dtype=dXXT.dtype, device=dXXT.device)
    for J in cols:  # A[:, J] = dXXT[:, J.start:] U[J, J.start:]^T
        tail = slice(J.start, None)
        _product_into(A[:, J.start - i1 : J.stop - i1], D[:, tail], _block(Hinv, J, tail, True))
    A.triu_(diagonal=1)  # [b, m]: j > i
    P = torch.empty_like(A)
    for K in cols:  # P[:, K] = A[:, :K.stop] U[i1:K.stop, K]
        head = slice(i1, K.stop)
        _product_into(P[:, K.start - i1 : K.stop - i1], A[:, : K.stop - i1], _block(Hinv, head, K))
    return P.mul_(alpha)


def _product_into(out: torch.Tensor, a: torch.Tensor, b: Factor) -> None:
    """``out = a @ b`` (``out`` a column block of a larger matrix); ``b`` as TF32 parts goes
    through :func:`matmul`."""
    if isinstance(b, torch.Tensor):
        torch.mm(a, b, out=out)
    else:
        out.copy_(matmul(a, b))


def solve_block_torch(
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
) -> None:
    """One block of Algorithm 1, column by column, into the caller's matrices.

    ``W1`` (``[out, b]``, not modified) holds the block's columns; column ``i`` uses the
    scale and zero of group ``groups[i]`` (rows of ``scales`` and ``zeros``, ``[groups,
    out]``). Writes the dequantized weights to ``Q1``, the codes to ``C1``, the errors
    divided by the pivots to ``E1`` (all ``[out, b]``) and adds the block's loss to
    ``losses`` (``[out]``). ``P1`` (``[b, b]``, strictly upper triangular) adds GPTAQ's
    term: column ``i``'s value before quantization (written to ``V1``), times
    ``P1[i, i:]``, moves the later columns towards ``W X``. ``find`` (``(first group, group
    size, bits, sym, min_zero)``, the group size dividing ``b``): first the min-max
    parameters of the block's groups, from ``W1``, into ``scales`` and ``zeros``.
    """
    if find is not None:
        g0, size, bits, sym, min_zero = find
        n = W1.shape[1] // size
        starts = range(0, n * size, size)
        record_groups(
            W1, starts, size, bits, sym, 0.0, min_zero, scales[g0 : g0 + n], zeros[g0 : g0 + n]
        )
    W1 = W1.clone()
    for i in range(W1.shape[1]):
        w = W1[:, i]
        d = Hinv1[i, i]
        s, z = scales[groups[i]], zeros[groups[i]]
        q = quantize(w, s, z, maxq)
        dq = dequantize(q, s, z)
        diff = w - dq
        losses += diff * diff / (d * d) * 0.5
        err = diff / d
        if P1 is None:
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        else:
            V1[:, i] = w  # before the update below, which changes column i too
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :] - w[:, None] * P1[i, i:][None, :]
        Q1[:, i], C1[:, i], E1[:, i] = dq, q, err


def finds_groups_in_block(
    group_size: int, static_groups: bool, mse: float, block_size: int = 128
) -> bool:
    """Whether the block solver finds the group parameters (:func:`gptq_quantize`): groups
    found from the updated W, each inside one block, by min-max alone."""
    return group_size != -1 and not static_groups and mse == 0 and block_size % group_size == 0


def record_groups(
    W: torch.Tensor,
    starts: Sequence[int],
    group_size: int,
    bits: int,
    sym: bool,
    mse: float,
    min_zero: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> None:
    """The parameters of the groups of ``W`` starting at columns ``starts``, from its columns
    as they are now, into the rows of ``scales`` and ``zeros`` (``[len(starts), out]``)."""
    gs = torch.stack([W[:, c : c + group_size] for c in starts], 0)  # [n, out, gs]
    p = find_params(gs.reshape(-1, group_size), bits, sym, mse, min_zero)
    scales.copy_(p.scale.view(len(starts), -1))
    zeros.copy_(p.zero.view(len(starts), -1))


def _parts_like(U: Factor, x: torch.Tensor) -> Factor:
    """``x`` as :func:`tf32_parts` where the factor ``U`` comes that way."""
    return x if isinstance(U, torch.Tensor) else tf32_parts(x)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: Factor, alpha: float) -> None:
    """``out += alpha * a @ b`` in place (``out`` may be a column block of a larger matrix:
    no temporary product where ``b`` is a tensor); ``b`` as TF32 parts goes through
    :func:`matmul`."""
    if isinstance(b, torch.Tensor):
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(matmul(a, b), alpha=alpha)


def _block_solver(solver: str, W: torch.Tensor):
    if solver == "torch" or (solver == "auto" and W.device.type != "cuda"):
        return solve_block_torch
    try:
        from gptq_worker.quant.solve_triton import solve_block_triton
    except ImportError:
        if solver == "triton":
            raise
        return solve_block_torch
    return solve_block_triton


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
