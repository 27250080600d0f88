"""Bit-exact GPTQ packing (the layout AutoGPTQ, GPTQModel, vLLM and LMDeploy read).

Along the packed dimension, values are laid end to end as a little-endian bit stream
(value ``k`` occupies bits ``k*bits .. k*bits+bits-1``) and the stream is cut into
int32 words. For 2/4/8 bits that is "word r holds values r*pf .. r*pf+pf-1, LSB first"
(``pf = 32/bits``); for 3 bits it is the 10|1|10|1|10 layout over 3 words per 32 values.

``qweight`` packs along the input dimension (``[in*bits/32, out]``), ``qzeros`` along
the output dimension (``[groups, out*bits/32]``). v1 (``gptq``) stores ``zero - 1``.
"""

from __future__ import annotations

import torch

from gptq_compat.config import CheckpointFormat


def values_per_chunk(bits: int) -> int:
    """How many values make a whole number of int32 words (32 for 3-bit, 32/bits otherwise)."""
    return 32 if 32 % bits else 32 // bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (``[n, cols]`` integers in ``[0, 2^bits)``) along dim 0 into int32.

    Returns ``[n*bits/32, cols]``. ``n`` must be a multiple of :func:`values_per_chunk`.
    """
    n, cols = values.shape
    chunk = values_per_chunk(bits)
    if n % chunk:
        raise ValueError(f"cannot pack {n} rows at {bits} bits: need a multiple of {chunk}")
    words_per_chunk = chunk * bits // 32
    v = values.to(torch.int64).reshape(n // chunk, chunk, cols)  # [chunks, chunk, cols]
    if (v < 0).any() or (v >= 2**bits).any():
        raise ValueError(f"values out of range for {bits}-bit packing")
    offsets = torch.arange(chunk, dtype=torch.int64) * bits  # bit offset of each value
    out = torch.zeros(n // chunk, words_per_chunk, cols, dtype=torch.int64, device=v.device)
    for word in range(words_per_chunk):
        shift = offsets - 32 * word  # position of each value inside this word
        touching = (shift > -bits) & (shift < 32)
        for k in torch.nonzero(touching).flatten().tolist():
            s = int(shift[k])
            part = v[:, k] << s if s >= 0 else v[:, k] >> -s
            out[:, word] |= part & 0xFFFFFFFF
    return _to_int32(out.reshape(-1, cols))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``[n*bits/32, cols]`` int32 -> ``[n, cols]`` int32."""
    chunk = values_per_chunk(bits)
    words_per_chunk = chunk * bits // 32
    cols = packed.shape[1]
    if n % chunk or packed.shape[0] != n * bits // 32:
        raise ValueError(
            f"packed tensor of {packed.shape[0]} words cannot hold {n} values of {bits} bits"
        )
    w = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(n // chunk, words_per_chunk, cols)
    mask = 2**bits - 1
    out = torch.zeros(n // chunk, chunk, cols, dtype=torch.int64, device=packed.device)
    for k in range(chunk):
        start = k * bits
        word, shift = divmod(start, 32)
        value = w[:, word] >> shift
        if shift + bits > 32:  # straddles into the next word (3-bit only)
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, k] = value & mask
    return out.reshape(n, cols).to(torch.int32)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ``[out, in]`` -> ``qweight`` ``[in*bits/32, out]``."""
    return pack_rows(codes.t().contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` -> codes ``[out, in]``."""
    return unpack_rows(qweight, bits, in_features).t().contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int, fmt: CheckpointFormat) -> torch.Tensor:
    """``zeros`` ``[groups, out]`` (true zero points) -> ``qzeros`` ``[groups, out*bits/32]``."""
    stored = zeros.to(torch.int64) - (1 if fmt == CheckpointFormat.GPTQ else 0)
    if (stored < 0).any():
        raise ValueError("a zero point of 0 cannot be stored in the v1 (gptq) format")
    return pack_rows(stored.t().contiguous(), bits).t().contiguous()


def unpack_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int, fmt: CheckpointFormat
) -> torch.Tensor:
    """``qzeros`` -> true zero points ``[groups, out]`` (int32)."""
    stored = unpack_rows(qzeros.t().contiguous(), bits, out_features).t()
    return (stored + (1 if fmt == CheckpointFormat.GPTQ else 0)).to(torch.int32)


def dequantize_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    fmt: CheckpointFormat,
) -> torch.Tensor:
    """The ``[out, in]`` fp32 weight a GPTQ checkpoint's tensors describe."""
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_features).float()  # [out, in]
    zeros = unpack_qzeros(qzeros, bits, out_features, fmt).float()  # [groups, out]
    g = g_idx.long()
    return scales.float()[g].t() * (codes - zeros[g].t())
