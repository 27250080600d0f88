"""GPTQ maths on small matrices, against brute-force references (tier 1)."""

from __future__ import annotations

import pytest
import torch

from gptq_worker.quant.gptq import (
    HessianNotPositiveDefinite,
    find_params,
    gptq_quantize,
    inverse_hessian_cholesky,
    rtn_quantize,
)
from gptq_worker.quant.hessian import accumulate_hessian


def _calibration(in_features: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with uneven column scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scale = torch.rand(in_features, generator=g) * 3 + 0.1
    return (torch.randn(tokens, in_features, generator=g) @ mix) * scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    H = torch.zeros(x.shape[1], x.shape[1])
    H, _ = accumulate_hessian(H, 0, x[None])
    return H


def _reference_rtn(W, bits, group_size, sym):
    """Min-max round-to-nearest written out plainly, group by group."""
    maxq = 2**bits - 1
    out = torch.empty_like(W)
    gs = W.shape[1] if group_size == -1 else group_size
    for g0 in range(0, W.shape[1], gs):
        w = W[:, g0 : g0 + gs]
        lo = w.min(1).values.clamp(max=0)
        hi = w.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        scale = ((hi - lo) / maxq).half().float()[:, None]
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo[:, None] / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        out[:, g0 : g0 + gs] = scale * (q - zero)
    return out


def _reference_obs(W, H, bits, damp=0.01):
    """Per-channel GPTQ the slow way: re-invert the remaining Hessian after every column.

    The optimal-brain-surgeon update of the paper (eq. 3) with no Cholesky trick and no
    lazy batching, in float64.
    """
    maxq = 2**bits - 1
    W, H = W.double().clone(), H.double().clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    p = find_params(W.float(), bits, sym=True)
    scale, zero = p.scale.double(), p.zero.double()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(H[j:, j:])  # inverse Hessian of the columns still free
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        Q[:, j] = scale * (q - zero)
        err = (W[:, j] - Q[:, j]) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0, :][None, :]
    return Q


def _output_error(W, Q, x):
    return float(((x @ (Q - W).t()) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_identity_hessian_is_round_to_nearest(bits, group_size, sym):
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    q = gptq_quantize(W, torch.eye(64), bits=bits, group_size=group_size, sym=sym)
    assert torch.equal(q.weight, _reference_rtn(W, bits, group_size, sym))


def test_blocked_solve_matches_brute_force_obs():
    torch.manual_seed(0)
    W = torch.randn(32, 96)
    H = _hessian(_calibration(96))
    fast = gptq_quantize(W, H, bits=3, group_size=-1, sym=True)
    slow = _reference_obs(W, H, bits=3)
    same = (fast.weight.double() - slow).abs() < 1e-4
    assert same.float().mean() > 0.995  # only float32-vs-float64 rounding ties may differ


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_output_error_is_below_rtn(bits, desc_act, sym):
    torch.manual_seed(bits)
    x = _calibration(128)
    W = torch.randn(48, 128)
    H = _hessian(x)
    gptq = gptq_quantize(W, H, bits=bits, group_size=32, sym=sym, desc_act=desc_act)
    rtn = rtn_quantize(W, bits=bits, group_size=32, sym=sym)
    assert _output_error(W, gptq.weight, x) < 0.8 * _output_error(W, rtn.weight, x)


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx_maps_every_column_to_its_group(static_groups):
    torch.manual_seed(1)
    W = torch.randn(16, 128)
    H = _hessian(_calibration(128))
    gs = 32
    q = gptq_quantize(
        W, H, bits=4, group_size=gs, sym=True, desc_act=True, static_groups=static_groups
    )
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    invperm = torch.argsort(perm)
    expected = torch.arange(128) // gs if static_groups else invperm // gs
    assert torch.equal(q.g_idx.long(), expected)
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((4,), gs))
    # codes, scales, zeros and g_idx describe exactly the weight the solve produced
    g = q.g_idx.long()
    rebuilt = q.scales[g].t() * (q.codes.float() - q.zeros[g].t().float())
    assert torch.equal(rebuilt, q.weight)


def test_static_groups_take_parameters_from_unupdated_weights():
    torch.manual_seed(2)
    W = torch.randn(8, 64)
    H = _hessian(_calibration(64))
    q = gptq_quantize(W, H, bits=4, group_size=16, sym=False, desc_act=True, static_groups=True)
    for g in range(4):
        p = find_params(W[:, g * 16 : (g + 1) * 16], 4, sym=False)
        assert torch.equal(q.scales[g], p.scale)
        assert torch.equal(q.zeros[g], p.zero.int())


def test_dead_columns_are_zeroed():
    torch.manual_seed(3)
    x = _calibration(32)
    x[:, 5] = 0
    q = gptq_quantize(torch.randn(8, 32), _hessian(x), bits=4, group_size=-1, sym=True)
    assert torch.all(q.weight[:, 5] == 0)


def test_damping_increases_until_cholesky_succeeds():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))  # indefinite
    U, damp = inverse_hessian_cholesky(H, 0.01, 0.01)
    assert damp > 0.05
    assert torch.isfinite(U).all()
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        inverse_hessian_cholesky(torch.diag(torch.tensor([1.0, -10.0])), 0.01, 0.1)


def test_inverse_factor_is_the_cholesky_factor_of_the_damped_inverse():
    """One factorisation of the reversed matrix and a triangular inverse give the upper
    Cholesky factor of ``(H + damp)^-1`` that the paper's inverse-then-factorise gives."""
    H = _hessian(_calibration(96, tokens=512, seed=4)).double()  # accumulated in fp32
    U, damp = inverse_hessian_cholesky(H, 0.01, 0.0025)
    assert damp == 0.01
    Hd = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(96, dtype=H.dtype)
    want = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.equal(U, U.triu())
    assert bool((torch.diagonal(U) > 0).all())
    torch.testing.assert_close(U, want, rtol=1e-9, atol=1e-12)
    # in fp32 too, as the engine runs it, against the fp64 factor
    U32, _ = inverse_hessian_cholesky(H.float(), 0.01, 0.0025)
    assert float((U32.double() - want).norm() / want.norm()) < 1e-4


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="in_features 100 is not a multiple of group_size 32"):
        gptq_quantize(torch.randn(4, 100), torch.eye(100), bits=4, group_size=32, sym=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_find_params_conventions(bits):
    maxq = 2**bits - 1
    w = torch.randn(10, 40)
    sym = find_params(w, bits, sym=True)
    assert torch.all(sym.zero == (maxq + 1) / 2)
    asym = find_params(w, bits, sym=False, min_zero=1)
    assert torch.all((asym.zero >= 1) & (asym.zero <= maxq))
    positive = find_params(w.abs(), bits, sym=False)  # xmin = 0 -> zero 0 unless clamped
    assert torch.all(positive.zero == 0)
    assert torch.all(find_params(w.abs(), bits, sym=False, min_zero=1).zero == 1)
    # scales are exactly what an fp16 checkpoint stores
    assert torch.equal(sym.scale, sym.scale.half().float())


def test_mse_grid_never_increases_error():
    torch.manual_seed(4)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[:, 0] *= 8  # outliers make a shrunk range worthwhile
    for sym in (True, False):
        plain, grid = find_params(w, 3, sym), find_params(w, 3, sym, mse=2.4)

        def err(p):
            q = torch.clamp(torch.round(w / p.scale[:, None]) + p.zero[:, None], 0, 7)
            return ((p.scale[:, None] * (q - p.zero[:, None]) - w).abs() ** 2.4).sum(1)

        assert torch.all(err(grid) <= err(plain) + 1e-5)
        assert err(grid).sum() < err(plain).sum()


def test_hessian_is_running_mean_of_two_x_xt():
    torch.manual_seed(5)
    batches = [torch.randn(3, 7, 16) for _ in range(4)]
    H, n = torch.zeros(16, 16), 0
    for b in batches:
        H, n = accumulate_hessian(H, n, b)
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    assert n == 12
    torch.testing.assert_close(H, 2 / 12 * x.t() @ x, rtol=1e-5, atol=1e-5)
