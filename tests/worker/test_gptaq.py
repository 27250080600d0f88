"""GPTAQ (arXiv:2504.02692): asymmetric calibration, min ||Q X~ - W X|| (section 3-4).

Checked against independent references on tiny problems: the cross term against fp64
products, the blocked solve against a plain column-by-column loop in fp64, and the
objective itself: GPTAQ's error is lower than plain GPTQ's when the streams differ and its
bits are plain GPTQ's when they are equal.
"""

from __future__ import annotations

import pytest
import torch

from gptq_worker.quant.gptq import (
    dequantize,
    find_params,
    gptaq_correction,
    gptaq_correction_rows,
    gptq_quantize,
    inverse_hessian_cholesky,
    quantize,
    tf32_parts,
)
from gptq_worker.quant.hessian import AsymmetricHessian

CPU = torch.device("cpu")


def streams(seed: int, tokens: int = 1024, n: int = 128, noise: float = 0.3):
    """Full-precision inputs X and quantized-model inputs X~ (``[tokens, in]``), weights."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) * torch.rand(n, generator=g) * 3
    Xq = X + noise * torch.randn(tokens, n, generator=g) * X.abs().mean(0)
    W = torch.randn(64, n, generator=g)
    return X, Xq, W


def terms(X, Xq, batches: int = 4):
    acc = AsymmetricHessian(X.shape[1], CPU, "fp32")
    for x, xq in zip(X.chunk(batches), Xq.chunk(batches), strict=True):
        acc.add_pair(xq, x)
    return acc.result(), acc.cross_result()


def output_error(Q, W, X, Xq) -> float:
    """The GPTAQ objective ``||Q X~ - W X||_F^2`` (rows of X are tokens)."""
    return float(((Xq.double() @ Q.double().t() - X.double() @ W.double().t()) ** 2).sum())


def test_cross_term_equals_the_fp64_product():
    X, Xq, _ = streams(0)
    H, D = terms(X, Xq)
    n = 4  # four 2-d batches: each counts as one sample, as in the reference
    Xd, Xqd = X.double(), Xq.double()
    torch.testing.assert_close(H.double(), 2 / n * Xqd.t() @ Xqd, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(D.double(), 2 / n * (Xd - Xqd).t() @ Xqd, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        {"bits": 4, "group_size": 32, "sym": True},
        {"bits": 3, "group_size": 64, "sym": False, "desc_act": True, "static_groups": True},
        {"bits": 4, "group_size": -1, "sym": True, "desc_act": True, "mse": 2.4},
    ],
    ids=["w4g32", "w3g64-act-static", "w4-perchannel-act-mse"],
)
def test_equal_streams_give_plain_gptq_bit_for_bit(kw):
    """X~ == X: the cross term is exactly zero, and so is every correction."""
    X, _, W = streams(1)
    H, D = terms(X, X)
    assert torch.count_nonzero(D) == 0
    plain = gptq_quantize(W, H, solver="torch", **kw)
    gptaq = gptq_quantize(W, H, solver="torch", dXXT=D, gptaq_alpha=1.0, **kw)
    for field in ("codes", "scales", "zeros", "g_idx", "weight", "row_losses"):
        assert torch.equal(getattr(plain, field), getattr(gptaq, field)), field


@pytest.mark.parametrize("alpha", [0.25, 1.0])
@pytest.mark.parametrize(
    "kw",
    [
        {"bits": 3, "group_size": 32, "sym": False},
        {"bits": 4, "group_size": 128, "sym": True, "desc_act": True, "static_groups": True},
    ],
    ids=["w3g32-asym", "w4g128-act-static"],
)
def test_gptaq_lowers_the_error_against_full_precision_outputs(kw, alpha):
    """X~ != X: ||Q X~ - W X|| is lower with GPTAQ than with GPTQ on the same H, every seed."""
    for seed in range(3):
        X, Xq, W = streams(seed)
        H, D = terms(X, Xq)
        plain = gptq_quantize(W, H, solver="torch", **kw).weight
        gptaq = gptq_quantize(W, H, solver="torch", dXXT=D, gptaq_alpha=alpha, **kw).weight
        assert output_error(gptaq, W, X, Xq) < output_error(plain, W, X, Xq), seed


def column_by_column(W, H, D, alpha, bits, sym):
    """The paper's update without lazy batches, in fp64, per channel (one scale per row):
    quantize column i, then move every later column j by ``-err_i U[i, j] + w_i P[i, j]``."""
    U, _ = inverse_hessian_cholesky(H.double(), 0.01, 0.0025)
    P = alpha * torch.triu(D.double() @ U.t(), diagonal=1) @ U
    W = W.double().clone()
    p = find_params(W.float(), bits, sym)
    scale, zero = p.scale.double(), p.zero.double()
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i].clone()
        Q[:, i] = dequantize(quantize(w, scale, zero, 2**bits - 1), scale, zero)
        err = (w - Q[:, i]) / U[i, i]
        W[:, i + 1 :] += -err[:, None] * U[i, i + 1 :] + w[:, None] * P[i, i + 1 :]
    return Q


@pytest.mark.parametrize("n", [256, 600], ids=["one-panel", "two-panels"])
def test_blocked_solve_equals_the_column_by_column_update(n):
    """Lazy batches of 64 columns in panels of 8 blocks (the columns after a panel updated
    once per panel, GPTAQ's correction rows formed per panel): one panel for 256 columns,
    two for 600 (the second narrower, ending in a 24-column block)."""
    X, Xq, W = streams(2, n=n, tokens=2 * n + 512)
    H, D = terms(X, Xq)
    got = gptq_quantize(
        W, H, bits=4, group_size=-1, sym=True, solver="torch", dXXT=D, gptaq_alpha=1.0,
        block_size=64,
    ).weight  # fmt: skip
    want = column_by_column(W, H, D, 1.0, 4, True)
    # fp32 against fp64: a code may round the other way where w sits on a midpoint
    same = (got.double() - want).abs() < 1e-4
    assert same.float().mean() > 0.995
    assert abs(output_error(got, W, X, Xq) / output_error(want.float(), W, X, Xq) - 1) < 1e-2


def test_correction_rows_are_the_rows_of_the_whole_correction():
    """Block by block, only the trailing blocks of ``U`` enter: the same ``P``, row for row,
    and zero before the block's first column."""
    X, Xq, _ = streams(3, n=200)
    # in fp64 (the accumulator returns fp32): in fp32 the two products round differently
    # wherever the BLAS blocks the whole and the partial products differently (torch 2.13's
    # CPU matmul does), so only fp64 can hold them to 1e-9
    H, D = (t.double() for t in terms(X.double(), Xq.double()))
    U, _ = inverse_hessian_cholesky(H, 0.01, 0.0025)
    P = gptaq_correction(D, U, 0.25)
    assert torch.count_nonzero(P.tril()) == 0
    for i1 in range(0, 200, 64):
        i2 = min(i1 + 64, 200)
        for width in (None, 32, 50):  # whole, or triangular blocks of 32 or 50 columns
            rows = gptaq_correction_rows(D, U, 0.25, i1, i2, width=width)
            assert rows.shape == (i2 - i1, 200 - i1)
            torch.testing.assert_close(rows, P[i1:i2, i1:], rtol=1e-9, atol=1e-12)
        assert torch.count_nonzero(P[i1:i2, :i1]) == 0


def test_tf32_parts_are_exact_and_tf32_representable():
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(5)) * 1e3
    hi, lo = tf32_parts(x)
    assert torch.equal(hi + lo, x)
    assert torch.count_nonzero(hi.view(torch.int32) & 8191) == 0  # 10 mantissa bits left
    assert float(lo.abs().max() / x.abs().max()) < 2**-10


@pytest.mark.parametrize("gptaq", [False, True])
def test_split_products_give_the_fp32_solve(gptaq):
    """The 3xTF32 form of the solve's products (an option, off by default) is the fp32
    computation up to rounding: on a CPU, where every product is fp32, nearly every code is
    the same and the objective is unchanged."""
    X, Xq, W = streams(4, n=256)
    H, D = terms(X, Xq)
    kw = dict(bits=4, group_size=64, sym=True, desc_act=True, static_groups=True)
    kw |= dict(solver="torch", dXXT=D if gptaq else None, block_size=64)
    fp32 = gptq_quantize(W, H, split_products=False, **kw)
    split = gptq_quantize(W, H, split_products=True, **kw)
    assert (fp32.codes == split.codes).float().mean() > 0.999
    ratio = output_error(split.weight, W, X, Xq) / output_error(fp32.weight, W, X, Xq)
    assert abs(ratio - 1) < 1e-3
    U, _ = inverse_hessian_cholesky(H, 0.01, 0.0025)
    rows = gptaq_correction_rows(D, U, 0.25, 64, 128)
    torch.testing.assert_close(
        gptaq_correction_rows(D, tf32_parts(U), 0.25, 64, 128), rows, rtol=1e-5, atol=1e-6
    )
