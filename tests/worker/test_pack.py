"""Bit-exact packing (tier 1), checked against the AutoGPTQ-style loops written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_compat.config import CheckpointFormat
from gptq_worker.format.pack import (
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)


def _reference_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The published loop: 2/4/8 bits LSB first; 3 bits as 10|1|10|1|10 over three words."""
    v = values.astype(np.uint64)
    rows = values.shape[0] * bits // 32
    out = np.zeros((rows, values.shape[1]), dtype=np.uint64)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= v[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i))
            i += 10
            out[row] |= v[i] << np.uint64(30)
            row += 1
            out[row] |= (v[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            out[row] |= v[i] << np.uint64(31)
            row += 1
            out[row] |= (v[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 40), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (64 * bits // 32, 40)
    assert np.array_equal(packed.numpy(), _reference_pack(values.numpy(), bits))
    assert torch.equal(unpack_rows(packed, bits, 64), values.int())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", list(CheckpointFormat))
@pytest.mark.parametrize("sym", [True, False])
def test_weight_and_zero_round_trips(bits, fmt, sym):
    g = torch.Generator().manual_seed(7)
    out_f, in_f, groups = 64, 128, 4
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    lo = 1 if fmt == CheckpointFormat.GPTQ else 0  # v1 cannot store a zero point of 0
    zeros = (
        torch.full((groups, out_f), 2 ** (bits - 1))
        if sym
        else torch.randint(lo, 2**bits, (groups, out_f), generator=g)
    )
    qweight = pack_qweight(codes, bits)
    qzeros = pack_qzeros(zeros, bits, fmt)
    assert qweight.shape == (in_f * bits // 32, out_f)
    assert qzeros.shape == (groups, out_f * bits // 32)
    assert torch.equal(unpack_qweight(qweight, bits, in_f), codes.int())
    assert torch.equal(unpack_qzeros(qzeros, bits, out_f, fmt), zeros.int())

    scales = torch.rand(groups, out_f).half()
    g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f // groups)
    w = dequantize_packed(qweight, qzeros, scales, g_idx, bits, fmt)
    expected = scales.float()[g_idx.long()].t() * (codes - zeros[g_idx.long()].t())
    assert torch.equal(w, expected)


def test_symmetric_4bit_qzeros_words():
    zeros = torch.full((2, 16), 8)
    assert torch.all(pack_qzeros(zeros, 4, CheckpointFormat.GPTQ) == 0x77777777)
    v2 = pack_qzeros(zeros, 4, CheckpointFormat.GPTQ_V2).numpy().view(np.uint32)
    assert np.all(v2 == 0x88888888)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.full((8, 4), 16), 4)
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_qzeros(torch.zeros(1, 8, dtype=torch.int64), 4, CheckpointFormat.GPTQ)
