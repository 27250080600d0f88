"""GPTQ layers of every format the engine writes, for the kernel tests (imported by the
Triton interpreter's subprocess too, so no relative imports)."""

from __future__ import annotations

import torch

from gptq_compat.config import CheckpointFormat
from gptq_worker.format.pack import dequantize_packed, pack_qweight, pack_qzeros, unpack_qzeros
from gptq_worker.kernels import gptq_triton as kernels

FORMATS = [
    (bits, sym, act, fmt)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for act in (False, True)
    for fmt in (CheckpointFormat.GPTQ, CheckpointFormat.GPTQ_V2)
]


def layer(bits, sym, act, fmt, k=256, n=96, group=64, seed=0):
    """Random codes, zero points, scales (and an act-order g_idx) packed as the engine does;
    returns the kernels' PackedWeight and the ``[out, in]`` weight pack.py reads back."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    groups = k // group
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1))
    else:  # v1 cannot store a zero point of 0
        low = 1 if fmt == CheckpointFormat.GPTQ else 0
        zeros = torch.randint(low, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // group
    if act:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    g_idx = g_idx.int()
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits, fmt)
    expected = dequantize_packed(qweight, qzeros, scales, g_idx, bits, fmt)
    true_zeros = unpack_qzeros(qzeros, bits, n, fmt).to(scales.dtype)
    return kernels.PackedWeight(qweight, true_zeros, scales, g_idx, bits), expected
