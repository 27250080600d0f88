"""Hessians of a layer's inputs: ``H = 2/n * X^T X`` (paper, eq. 2), and GPTAQ's cross term.

Pure accumulation on tensors; the driver feeds each batch of a module's inputs in.
"""

from __future__ import annotations

import functools
import math

import torch


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


class Hessian:
    """Running ``H = 2/n * sum x x^T`` over batches of layer inputs.

    ``precision="tensor-core"``: fp16/bf16 inputs on CUDA are multiplied on the tensor
    cores into an fp32 result (``torch.mm(..., out_dtype=float32)``), about 14x faster than
    fp32 products. The products are exact, but the tensor cores' accumulation is not IEEE
    fp32: on an H200 the result is 9e-5 (fp16) / 6e-5 (bf16) from an fp64 reference in
    relative Frobenius norm, against 3e-6 / 5e-6 for the fp32 path
    (``bench/hessian_precision.py``). Perplexity after quantization showed no systematic
    change over 3 calibration seeds (``bench/quality.py --precision-seeds``).
    ``"fp32"`` always converts to fp32 first (the switch, and what CPUs do anyway). The
    scale ``2/n`` is applied once, at the end.
    """

    # ``X^T X`` is symmetric: from this width on only the blocks on and below the diagonal
    # are multiplied (``symmetric_blocks``) and the others are mirrored once, at the end
    SYMMETRIC_FROM = 8192

    def __init__(self, features: int, device: torch.device, precision: str = "tensor-core"):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0
        self.fast = (
            precision == "tensor-core" and torch.device(device).type == "cuda" and _has_mm_dtype()
        )
        self.blocks = (
            symmetric_blocks(features) if features >= self.SYMMETRIC_FROM else [slice(None)]
        )

    def add(self, x: torch.Tensor) -> None:
        """``x`` is ``[batch, ..., in]``: each leading entry counts as one sample."""
        self.count += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1])
        fast = self.fast and x.dtype in (torch.float16, torch.bfloat16)
        if not fast:
            x = x.float()
        for a, rows in enumerate(self.blocks):
            for cols in self.blocks[: a + 1]:  # the lower triangle of blocks
                if fast:
                    _add_product(self.sum[rows, cols], x[:, rows].t(), x[:, cols])
                else:
                    self.sum[rows, cols].addmm_(x[:, rows].t(), x[:, cols])

    def result(self) -> torch.Tensor:
        for a, rows in enumerate(self.blocks):  # mirror the lower blocks (none when whole)
            for cols in self.blocks[:a]:
                self.sum[cols, rows] = self.sum[rows, cols].t()
        return self.sum.mul_(2 / max(self.count, 1))


def symmetric_blocks(features: int, target: int = 4096) -> list[slice]:
    """Equal column blocks of ``features`` for :class:`Hessian`'s lower-triangle products:
    the count (2 to 8) whose width, a multiple of 128, is nearest ``target`` (wide enough for
    the tensor cores to run at full rate); one block when none divides. ``n`` blocks
    multiply ``(n + 1) / 2n`` of the whole product: 5/8 for 14336 (Llama-3-8B's
    ``down_proj``) in four blocks of 3584, 4/7 for 28672 (70B) in seven of 4096."""
    widths = [
        (abs(features // n - target), n)
        for n in range(2, 9)
        if features % n == 0 and (features // n) % 128 == 0
    ]
    if not widths:
        return [slice(None)]
    n = min(widths)[1]
    w = features // n
    return [slice(k * w, (k + 1) * w) for k in range(n)]


class AsymmetricHessian(Hessian):
    """``H = 2/n X~ X~^T`` and GPTAQ's cross term ``dXXT = 2/n (X - X~) X~^T`` (both ``[in, in]``).

    ``X~`` are the layer inputs of the partly quantized model (what the quantized weights
    will see), ``X`` the inputs of the full-precision model (GPTAQ, arXiv:2504.02692,
    section 3.1: the objective is ``min ||Q X~ - W X||``). Batches come as ``[tokens, in]``
    pairs; the difference is taken in the inputs' dtype (Sterbenz: exact where the two
    streams are within a factor 2 of each other) and multiplied like ``H``.
    """

    def __init__(self, features: int, device: torch.device, precision: str = "tensor-core"):
        super().__init__(features, device, precision)
        self.cross = torch.zeros_like(self.sum)

    def add_pair(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        """``x`` (quantized stream) and ``x_fp`` (full-precision stream), same shape."""
        self.add(x)
        x = x.reshape(-1, x.shape[-1])
        dx = x_fp.reshape(-1, x_fp.shape[-1]) - x  # [tokens, in]
        if self.fast and x.dtype in (torch.float16, torch.bfloat16):
            _add_product(self.cross, dx.t(), x)
        else:
            self.cross.addmm_(dx.float().t(), x.float())

    def cross_result(self) -> torch.Tensor:
        return self.cross.mul_(2 / max(self.count, 1))


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` for fp16/bf16 ``a``, ``b`` into fp32 ``out`` (possibly a block of a
    larger matrix) on the tensor cores: in the product's epilogue where this torch's
    ``addmm(..., out_dtype=)`` writes such a block in place (one pass over ``out`` instead
    of a temporary product and an addition reading both), else product, then addition."""
    if _has_addmm_dtype(out.device.index or 0):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out += torch.mm(a, b, out_dtype=torch.float32)


@functools.cache
def _has_addmm_dtype(device: int) -> bool:
    """Whether ``torch.addmm(C, A, B, out_dtype=float32, out=C)`` adds into a column block of
    a larger fp32 matrix correctly on this torch and GPU (asked once per process): checked
    against product-then-addition on a small case."""
    try:
        gen = torch.Generator(device=f"cuda:{device}").manual_seed(0)
        a = torch.randn(64, 48, device=f"cuda:{device}", generator=gen).half()
        b = torch.randn(48, 96, device=f"cuda:{device}", generator=gen).half()
        base = torch.randn(64, 160, device=f"cuda:{device}", generator=gen)
        want = base.clone()
        want[:, 32:128] += torch.mm(a, b, out_dtype=torch.float32)
        got = base.clone()
        block = got[:, 32:128]
        torch.addmm(block, a, b, out_dtype=torch.float32, out=block)
        return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))
    except Exception:  # no such overload, or no kernel for it: the two-step path
        return False


@functools.cache
def _has_mm_dtype() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=)`` on CUDA (asked once per process)."""
    try:
        a = torch.zeros(2, 2, dtype=torch.float16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False
