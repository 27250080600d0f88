"""Fused GPTQ dequantize-and-multiply for the built-in runtime: Triton on CUDA, torch elsewhere.

It is longer than 400 lines because the kernels, their torch reference and the tuner
must agree on one index arithmetic and are read together.

One kernel covers every format the engine writes: 2/3/4/8 bits, symmetric or not (zero
points are always read: a symmetric checkpoint stores ``2^(bits-1)``), any group size, and
act-order ``g_idx``. It reads the packed ``qweight`` words (``format/pack.py``: values laid
end to end as a little-endian bit stream along the input dimension, cut into int32
words), so value ``k`` of a column starts at bit ``k*bits``: word ``k*bits // 32``, shift
``k*bits % 32``; at 3 bits, values at shift 30 and 31 take their high bits from the next
word. For 2/4/8 bits a word holds ``32/bits`` whole values and the kernel loads each word
once and shifts it out; for 3 bits it gathers the one or two words of each value.

``y[m, n] = sum_k x[m, k] * scale[g(k), n] * (code[k, n] - zero[g(k), n])``: each program
dequantizes a ``[BLOCK_K, BLOCK_N]`` tile in fp32, rounds it to the activations' dtype
(fp16: the same rounding as the torch path's fp16 weight) and multiplies it on the tensor
cores with fp32 accumulation. Where ``g_idx`` is the plain ``k // group_size`` a tile lies
in one group and reads one row of scales and zeros; otherwise (act-order) it gathers the
row of each ``k``. Small ``M`` (decoding) splits ``K`` across programs, which add their
partial sums with fp32 atomics, so that even a 4096-wide layer fills the GPU. Large ``M``
(prefill) dequantizes the layer once into an fp16 buffer (:func:`dequantize`) and runs
``torch.matmul``.

For 4/8-bit layers in plain groups with fp16 activations a second tile kernel swaps the
operands (:func:`_qmt_kernel`: ``out^T = W^T x^T``): the dequantized weight tile is the
tensor cores' first operand and the few activation rows the second. On an H200 it took a
Llama-3-8B decode step's matmuls from 3.83 to 3.03 ms at 1 row and from 5.98 to 3.97 ms at
32 rows (``bench/kernel_variants.py``); the tuner times it beside the others.

:func:`reference_matmul` is the same index arithmetic in torch (the CPU tests compare it
with ``pack.dequantize_packed``; the GPU bench compares the kernel with it), and
``TRITON_INTERPRET=1`` runs the kernels themselves on CPU tensors (tests do).
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, some CPUs): the torch path serves
    triton = None

log = logging.getLogger(__name__)
FUSED_MAX_M = 64  # rows up to which the fused kernel runs; above, dequantize + matmul
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x`` (CUDA fp16/bf16; or the interpreter)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def plain_group(g_idx: torch.Tensor, groups: int) -> int:
    """The group size if ``g_idx`` is ``k // group_size`` (no act-order), else 0."""
    k = g_idx.shape[0]
    if groups < 1 or k % groups:
        return 0
    size = k // groups
    expected = torch.arange(k, device=g_idx.device, dtype=torch.int64) // size
    return size if torch.equal(g_idx.to(torch.int64), expected) else 0


class PackedWeight:
    """A GPTQ layer's tensors as the kernels read them.

    ``qweight`` ``[K*bits/32, N]`` int32 (a column slice of a fused tensor is fine),
    ``zeros`` ``[groups, N]`` true zero points in the scales' dtype, ``scales``
    ``[groups, N]``, ``g_idx`` ``[K]`` int32.
    """

    def __init__(self, qweight, zeros, scales, g_idx, bits: int) -> None:
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"no kernel for {bits}-bit weights")
        self.qweight, self.zeros, self.scales = qweight, zeros, scales
        self.g_idx = g_idx.to(torch.int32).contiguous()
        self.bits = bits
        self.in_features, self.out_features = g_idx.shape[0], scales.shape[1]
        group = plain_group(g_idx, scales.shape[0])
        block_k = next((b for b in (128, 64, 32) if group and group % b == 0), 0)
        # a tile in one group reads one row of scales; otherwise gather per k
        self.group = group if block_k else 0
        self.block_k = block_k or (64 if bits == 3 else 128)
        # the fp16 dequantization (:func:`_half`) is exact for fp16 scales and integer
        # zero points below 1024 in magnitude (every GPTQ checkpoint's)
        self.half = (
            scales.dtype == torch.float16
            and bool(torch.equal(zeros, zeros.round()))
            and bool((zeros.abs() < 1024).all())
        )

    def key(self) -> tuple:
        return (self.in_features, self.out_features, self.bits, self.group > 0)


# -- torch (reference and CPU) ----------------------------------------------------------


def reference_weight(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[K, N]`` weight by the kernel's own index arithmetic (bit stream, word, shift)."""
    k = torch.arange(w.in_features, device=w.qweight.device, dtype=torch.int64)
    bit = k * w.bits
    word, shift = bit // 32, (bit % 32)[:, None]
    words = w.qweight.to(torch.int64) & 0xFFFFFFFF  # as unsigned
    value = words[word] >> shift
    straddle = (shift + w.bits > 32).expand_as(value)
    if straddle.any():  # 3-bit values at shift 30/31 continue in the next word
        nxt = words[(word + 1).clamp(max=words.shape[0] - 1)] << (32 - shift)
        value = torch.where(straddle, value | nxt, value)
    codes = (value & (2**w.bits - 1)).to(torch.float32)
    g = w.g_idx.long()
    weight = (codes - w.zeros.float()[g]) * w.scales.float()[g]
    return weight.to(dtype)


def reference_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W`` in fp32 with the kernel's dequantization (the weight rounded to ``x``'s
    dtype first, as the kernel does)."""
    weight = reference_weight(w, torch.float32).to(x.dtype).float()
    return (x.float() @ weight).to(x.dtype)


# -- Triton -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _codes(qw_ptr, sqk, sqn, k0, rn, nmask, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
        """``[BLOCK_K, BLOCK_N]`` codes (uint32) of rows ``k0 ..``."""
        if BITS == 3:
            rk = k0 + tl.arange(0, BLOCK_K)
            bit = rk * 3
            word = bit // 32
            shift = (bit % 32).to(tl.uint32)
            m = (rk < K)[:, None] & nmask[None, :]
            ptr = qw_ptr + word[:, None] * sqk + rn[None, :] * sqn
            w0 = tl.load(ptr, mask=m, other=0).to(tl.uint32, bitcast=True)
            straddle = (shift > 29)[:, None]
            w1 = tl.load(ptr + sqk, mask=m & straddle, other=0).to(tl.uint32, bitcast=True)
            up = ((32 - shift) % 32)[:, None]
            v = (w0 >> shift[:, None]) | (w1 << up)
            return v & 7
        else:
            rw = k0 // (32 // BITS) + tl.arange(0, BLOCK_K * BITS // 32)
            m = (rw < K * BITS // 32)[:, None] & nmask[None, :]
            words = tl.load(qw_ptr + rw[:, None] * sqk + rn[None, :] * sqn, mask=m, other=0)
            words = words.to(tl.uint32, bitcast=True)
            shifts = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)
            v = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            return tl.reshape(v, (BLOCK_K, BLOCK_N))

    @triton.jit
    def _weights(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn, k0, rn, nmask, K,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
        """``[BLOCK_K, BLOCK_N]`` dequantized weights (fp32)."""
        codes = _codes(qw_ptr, sqk, sqn, k0, rn, nmask, K, BITS, BLOCK_K, BLOCK_N)
        codes = codes.to(tl.float32)
        if GROUP > 0:  # the whole tile lies in group k0 // GROUP
            g = k0 // GROUP
            s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * szg + rn * szn, mask=nmask, other=0).to(tl.float32)
            w = (codes - z[None, :]) * s[None, :]
        else:  # act-order: each k has its own group
            rk = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(g_ptr + rk, mask=rk < K, other=0)
            m = (rk < K)[:, None] & nmask[None, :]
            s = tl.load(s_ptr + g[:, None] * ssg + rn[None, :] * ssn, mask=m, other=0)
            z = tl.load(z_ptr + g[:, None] * szg + rn[None, :] * szn, mask=m, other=0)
            w = (codes - z.to(tl.float32)) * s.to(tl.float32)
        return w

    @triton.jit
    def _half(codes, z, s):
        """fp16 ``(code - z) * s`` without int-to-float conversions: ``0x6400 | code`` is the
        fp16 bit pattern of ``1024 + code``, so ``(1024 + code) - (1024 + z)`` is the exact
        integer ``code - z`` and one fp16 multiply by ``s`` rounds it once, as the
        reference's fp32 product rounded to fp16 (``z`` integers below 1024, ``s`` fp16)."""
        wf = (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        return (wf - z) * s

    @triton.jit
    def _weights16(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn, k0, rn, nmask,
                   K, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
        """:func:`_weights` in fp16 by :func:`_half` (fp16 scales, integer zeros)."""
        codes = _codes(qw_ptr, sqk, sqn, k0, rn, nmask, K, BITS, BLOCK_K, BLOCK_N)
        if GROUP > 0:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0).to(tl.float16)
            z = tl.load(z_ptr + g * szg + rn * szn, mask=nmask, other=0).to(tl.float32)
            w = _half(codes, (z + 1024.0).to(tl.float16)[None, :], s[None, :])
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(g_ptr + rk, mask=rk < K, other=0)
            m = (rk < K)[:, None] & nmask[None, :]
            s = tl.load(s_ptr + g[:, None] * ssg + rn[None, :] * ssn, mask=m, other=0)
            z = tl.load(z_ptr + g[:, None] * szg + rn[None, :] * szn, mask=m, other=0)
            w = _half(codes, (z.to(tl.float32) + 1024.0).to(tl.float16), s.to(tl.float16))
        return w

    @triton.jit
    def _qmm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, M, N, K, k_per_split,
                    sxm, sxk, sqk, sqn, ssg, ssn, szg, szn, som, son,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANES: tl.constexpr,
                    ATOMIC: tl.constexpr, F16: tl.constexpr, XP: tl.constexpr):  # fmt: skip
        """Tensor-core tiles. ``PLANES``: for 4/8 bits, multiply the ``32/bits`` values of
        each word as separate planes (k = word*pf + j), so that no tile is reshaped;
        otherwise dequantize ``[BLOCK_K, BLOCK_N]`` in k order. ``F16``: dequantize in fp16
        by :func:`_half` (fp16 activations and scales, integer zeros), else in fp32.
        ``XP``: ``x`` comes in plane order (:func:`plane_order`), so that each plane's
        activations are one contiguous run of columns instead of every ``32/bits``-th."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if PLANES:
                rr = tl.arange(0, BLOCK_K * BITS // 32)
                rw = k0 // (32 // BITS) + rr
                m = (rw < K * BITS // 32)[:, None] & nmask[None, :]
                words = tl.load(qw_ptr + rw[:, None] * sqk + rn[None, :] * sqn, mask=m, other=0)
                words = words.to(tl.uint32, bitcast=True)
                if GROUP > 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0).to(tl.float32)
                    z = tl.load(z_ptr + g * szg + rn * szn, mask=nmask, other=0).to(tl.float32)
                    s16 = s.to(tl.float16)[None, :]
                    z16 = (z + 1024.0).to(tl.float16)[None, :]
                for j in tl.static_range(32 // BITS):
                    kk = k0 + rr * (32 // BITS) + j
                    if F16:
                        codes = (words >> (j * BITS)) & ((1 << BITS) - 1)
                    else:
                        codes = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                    if GROUP > 0:
                        if F16:  # noqa: SIM108 (constexpr branches in a Triton kernel)
                            w = _half(codes, z16, s16)
                        else:
                            w = (codes - z[None, :]) * s[None, :]
                    elif F16:
                        gk = tl.load(g_ptr + kk, mask=kk < K, other=0)
                        sk = tl.load(s_ptr + gk[:, None] * ssg + rn[None, :] * ssn, mask=m,
                                     other=0)  # fmt: skip
                        zk = tl.load(z_ptr + gk[:, None] * szg + rn[None, :] * szn, mask=m,
                                     other=0)  # fmt: skip
                        w = _half(codes, (zk.to(tl.float32) + 1024.0).to(tl.float16),
                                  sk.to(tl.float16))  # fmt: skip
                    else:
                        gk = tl.load(g_ptr + kk, mask=kk < K, other=0)
                        sk = tl.load(s_ptr + gk[:, None] * ssg + rn[None, :] * ssn, mask=m,
                                     other=0)  # fmt: skip
                        zk = tl.load(z_ptr + gk[:, None] * szg + rn[None, :] * szn, mask=m,
                                     other=0)  # fmt: skip
                        w = (codes - zk.to(tl.float32)) * sk.to(tl.float32)
                    xm = mmask[:, None] & (kk < K)[None, :]
                    # plane j of this block: columns k0 + j * words .. (contiguous)
                    if XP:  # noqa: SIM108 (a constexpr branch in a Triton kernel)
                        kx = k0 + j * (BLOCK_K * BITS // 32) + rr
                    else:
                        kx = kk
                    x = tl.load(x_ptr + rm[:, None] * sxm + kx[None, :] * sxk, mask=xm, other=0.0)
                    acc += tl.dot(x, w.to(x.dtype))
            else:
                rk = k0 + tl.arange(0, BLOCK_K)
                xm = mmask[:, None] & (rk < K)[None, :]
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=xm, other=0.0)
                if F16:
                    w = _weights16(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn,
                                   k0, rn, nmask, K, BITS, GROUP, BLOCK_K, BLOCK_N)  # fmt: skip
                else:
                    w = _weights(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn, k0,
                                 rn, nmask, K, BITS, GROUP, BLOCK_K, BLOCK_N)  # fmt: skip
                acc += tl.dot(x, w.to(x.dtype))
        ptrs = out_ptr + rm[:, None] * som + rn[None, :] * son
        om = mmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=om)
        else:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _qmt_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split,
                    sxm, sxk, sqk, sqn, ssg, ssn, szg, szn, som, son,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                    XP: tl.constexpr):  # fmt: skip
        """Few rows with the operands swapped: ``out^T [N, M] = W^T [N, K] @ x^T [K, M]``,
        so the dequantized weight is the tensor cores' first operand (which stays in
        registers) and the few activation rows the second. 4/8 bits, plain groups, fp16
        (:func:`_half`), word planes as in :func:`_qmm_kernel`; ``BLOCK_K`` may span
        several groups (the scales of each word's group are gathered)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        PF: tl.constexpr = 32 // BITS
        RR: tl.constexpr = BLOCK_K // PF
        rr = tl.arange(0, RR)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rw = k0 // PF + rr
            m = nmask[:, None] & (rw < K // PF)[None, :]
            words = tl.load(qw_ptr + rn[:, None] * sqn + rw[None, :] * sqk, mask=m, other=0)
            words = words.to(tl.uint32, bitcast=True)
            if BLOCK_K <= GROUP:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0).to(tl.float16)
                z = tl.load(z_ptr + g * szg + rn * szn, mask=nmask, other=0).to(tl.float32)
                s16 = s[:, None]
                z16 = (z + 1024.0).to(tl.float16)[:, None]
            else:
                g = (k0 + rr * PF) // GROUP
                s16 = tl.load(s_ptr + g[None, :] * ssg + rn[:, None] * ssn, mask=m,
                              other=0).to(tl.float16)  # fmt: skip
                zz = tl.load(z_ptr + g[None, :] * szg + rn[:, None] * szn, mask=m, other=0)
                z16 = (zz.to(tl.float32) + 1024.0).to(tl.float16)
            for j in tl.static_range(PF):
                codes = (words >> (j * BITS)) & ((1 << BITS) - 1)
                w = _half(codes, z16, s16)
                if XP:  # noqa: SIM108 (a constexpr branch in a Triton kernel)
                    kx = k0 + j * RR + rr
                else:
                    kx = k0 + rr * PF + j
                xm = (kx < K)[:, None] & mmask[None, :]
                xt = tl.load(x_ptr + rm[None, :] * sxm + kx[:, None] * sxk, mask=xm, other=0.0)
                acc += tl.dot(w, xt.to(tl.float16))
        ptrs = out_ptr + rm[None, :] * som + rn[:, None] * son
        om = nmask[:, None] & mmask[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=om)
        else:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _qmv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, k_per_split,
                    sqk, sqn, ssg, ssn, szg, szn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
        """One row (batch-1 decode): products accumulate element-wise in fp32 registers
        and are summed once at the end; no tensor cores, no tile reshapes."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if BITS == 3:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                w = _weights(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn, k0, rn,
                             nmask, K, BITS, GROUP, BLOCK_K, BLOCK_N)  # fmt: skip
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
                acc += w * x[:, None]
            y = tl.sum(acc, axis=0)
        else:
            rr = tl.arange(0, BLOCK_K * BITS // 32)
            jj = tl.arange(0, 32 // BITS)
            shifts = (jj * BITS).to(tl.uint32)
            acc = tl.zeros((BLOCK_K * BITS // 32, 32 // BITS, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                rw = k0 * BITS // 32 + rr
                m = (rw < K * BITS // 32)[:, None] & nmask[None, :]
                words = tl.load(qw_ptr + rw[:, None] * sqk + rn[None, :] * sqn, mask=m, other=0)
                words = words.to(tl.uint32, bitcast=True)
                codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
                codes = codes.to(tl.float32)
                kk = k0 + rr[:, None] * (32 // BITS) + jj[None, :]  # [words, values a word]
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                if GROUP > 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0).to(tl.float32)
                    z = tl.load(z_ptr + g * szg + rn * szn, mask=nmask, other=0).to(tl.float32)
                    acc += (codes - z[None, None, :]) * (x[:, :, None] * s[None, None, :])
                else:
                    gk = tl.load(g_ptr + kk, mask=kk < K, other=0)
                    m3 = (kk < K)[:, :, None] & nmask[None, None, :]
                    sk = tl.load(s_ptr + gk[:, :, None] * ssg + rn[None, None, :] * ssn,
                                 mask=m3, other=0).to(tl.float32)  # fmt: skip
                    zk = tl.load(z_ptr + gk[:, :, None] * szg + rn[None, None, :] * szn,
                                 mask=m3, other=0).to(tl.float32)  # fmt: skip
                    acc += (codes - zk) * sk * x[:, :, None]
            y = tl.sum(tl.sum(acc, axis=1), axis=0)
        if ATOMIC:
            tl.atomic_add(out_ptr + rn, y, mask=nmask)
        else:
            tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K,
                        sqk, sqn, ssg, ssn, szg, szn, sok, son,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
        k0 = tl.program_id(0) * BLOCK_K
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        w = _weights(qw_ptr, s_ptr, z_ptr, g_ptr, sqk, sqn, ssg, ssn, szg, szn, k0, rn,
                     nmask, K, BITS, GROUP, BLOCK_K, BLOCK_N)  # fmt: skip
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = out_ptr + rk[:, None] * sok + rn[None, :] * son
        tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=(rk < K)[:, None] & nmask[None, :])


DEFAULT_CONFIG = (64, 4)  # BLOCK_N, programs per multiprocessor to aim for (K split)
# what :func:`tune` chose: (layer key, row bucket) -> (kind, BLOCK_N, per SM, stages, warps)
_TUNED: dict[tuple, tuple] = {}
TIMINGS: dict[tuple, dict] = {}  # every configuration :func:`tune` timed (microseconds)
# the row counts tuned; more rows use the last choice. 256: the fused serving step that
# carries new prompts (up to 256 prompt tokens beside the decoding rows), where tiles that
# dequantize in registers cost in proportion to the rows and "dq" (dequantize the layer
# once into a scratch buffer, then cuBLAS) may win
ROW_BUCKETS = (1, 16, 32, 64, 256)


def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@__import__("functools").lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _args(w: PackedWeight) -> tuple:
    return (
        w.qweight.stride(0),
        w.qweight.stride(1),
        w.scales.stride(0),
        w.scales.stride(1),
        w.zeros.stride(0),
        w.zeros.stride(1),
    )


def _split(x, w: PackedWeight, tiles: int, per_sm: int, block_k: int = 0) -> tuple[int, int]:
    """(programs along K, K per program) to aim for ``per_sm`` programs a multiprocessor,
    with K tiles of ``block_k`` (default the layer's)."""
    block_k = block_k or w.block_k
    steps = triton.cdiv(w.in_features, block_k)
    split = max(1, min(steps, math.ceil(per_sm * _processors(x.device) / tiles)))
    k_per_split = triton.cdiv(steps, split) * block_k
    return triton.cdiv(w.in_features, k_per_split), k_per_split


def _output(x: torch.Tensor, n: int, atomic: bool, fp32: bool) -> torch.Tensor:
    """The kernels' output: zeroed fp32 for atomic partial sums, else fp32 or ``x``'s dtype."""
    if atomic:
        return torch.zeros((x.shape[0], n), device=x.device, dtype=torch.float32)
    return torch.empty((x.shape[0], n), device=x.device, dtype=torch.float32 if fp32 else x.dtype)


def row_bucket(m: int) -> int:
    return next((b for b in ROW_BUCKETS if m <= b), ROW_BUCKETS[-1])


def plane_order(x: torch.Tensor, w: PackedWeight, block_k: int = 0) -> torch.Tensor | None:
    """``x [M, K]`` with each ``block_k`` block's columns (default the layer's) in the
    planes' order (value ``j`` of word ``r`` at ``j * words + r``), or None where the
    planes do not apply."""
    pf = 32 // w.bits
    block_k = block_k or w.block_k
    if not (w.bits in (4, 8) and block_k * w.bits // 32 >= 16 and w.in_features % block_k == 0):
        return None
    m, k = x.shape
    blocks = k // block_k
    return x.reshape(m, blocks, block_k // pf, pf).transpose(2, 3).reshape(m, k)


def swapped_applies(w: PackedWeight, block_k: int) -> bool:
    """Whether the swapped-operand kernel (:func:`_qmt_kernel`) takes this layer with K
    tiles of ``block_k``: 4/8 bits, plain groups whose size a word's values do not
    straddle, fp16 dequantization, and K a whole number of tiles."""
    pf = 32 // max(w.bits, 1)
    return (
        w.bits in (4, 8)
        and w.group > 0
        and w.group % pf == 0
        and ((block_k <= w.group and w.group % block_k == 0) or block_k % w.group == 0)
        and w.half
        and block_k // pf >= 16
        and w.in_features % block_k == 0
    )


def fused_matmul(x: torch.Tensor, w: PackedWeight, config: tuple | None = None,
                 kind: str | None = None, fp32: bool = False):  # fmt: skip
    """``x [M, K] @ W -> [M, N]`` by a fused kernel: ``kind`` "mv" (one row), "mm"
    (tensor cores, any ``M``), "mt" (:func:`_swapped`) or "dq" (not fused: the layer
    dequantized into a temporary buffer, then ``x @ W``; its fp32 output is the product
    rounded to ``x``'s dtype). ``config``: (BLOCK_N, programs per multiprocessor[,
    num_stages[, num_warps[, BLOCK_M[, plane-ordered x]]]]) (BLOCK_M 0: 16, 32 or 64 by
    ``M``), else what :func:`tune` chose for this row count, else a default. ``fp32``:
    return the fp32 sums (no rounding to ``x``'s
    dtype, no extra cast)."""
    m, n, k = x.shape[0], w.out_features, w.in_features
    if config is None:
        tuned = _TUNED.get((*w.key(), row_bucket(m)))
        usable = tuned is not None and (m == 1 or tuned[0] != "mv")
        if usable and tuned[0] == "mt":  # tuned on a layer of this shape; this one may differ
            usable = x.dtype == torch.float16 and swapped_applies(w, tuned[-1])
        if usable and (kind is None or kind == tuned[0]):
            kind, config = tuned[0], tuned[1:]
    kind = kind or ("mv" if m == 1 else "mm")
    if kind == "dq":  # the whole layer dequantized in x's dtype, then a dense product
        y = x @ dequantize(w, x.dtype)
        return y.float() if fp32 else y
    config = tuple(config or DEFAULT_CONFIG)
    block_n, per_sm = config[0], config[1]
    stages = config[2] if len(config) > 2 else (2 if (w.bits == 3 or not w.group) else 3)
    warps = config[3] if len(config) > 3 else (8 if block_n >= 128 else 4)
    tile_m = config[4] if len(config) > 4 else 0
    if kind == "mt":
        return _swapped(x, w, config, fp32)
    xp = plane_order(x, w) if len(config) > 5 and config[5] and kind == "mm" else None
    if kind == "mv":
        if m != 1:
            raise ValueError("the mv kernel takes one row")
        split, k_per_split = _split(x, w, triton.cdiv(n, block_n), per_sm)
    else:
        block_m = tile_m or (16 if m <= 16 else 32 if m <= 32 else 64)
        split, k_per_split = _split(x, w, triton.cdiv(n, block_n) * triton.cdiv(m, block_m), per_sm)
    atomic = split > 1
    out = _output(x, n, atomic, fp32)
    if kind == "mv":
        grid = (triton.cdiv(n, block_n), split)
        _qmv_kernel[grid](
            x, w.qweight, w.scales, w.zeros, w.g_idx, out, n, k, k_per_split, *_args(w),
            BITS=w.bits, GROUP=w.group, BLOCK_N=block_n, BLOCK_K=w.block_k, ATOMIC=atomic,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    else:
        planes = w.bits in (4, 8) and w.block_k * w.bits // 32 >= 16
        half = w.half and x.dtype == torch.float16
        grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
        xin = x if xp is None else xp
        _qmm_kernel[grid](
            xin, w.qweight, w.scales, w.zeros, w.g_idx, out, m, n, k, k_per_split,
            xin.stride(0), xin.stride(1), *_args(w), out.stride(0), out.stride(1),
            BITS=w.bits, GROUP=w.group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=w.block_k,
            PLANES=planes, ATOMIC=atomic, F16=half, XP=xp is not None, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    return out.to(x.dtype) if atomic and not fp32 else out


def _swapped(x: torch.Tensor, w: PackedWeight, config: tuple, fp32: bool) -> torch.Tensor:
    """:func:`_qmt_kernel`; ``config`` (BLOCK_N, per SM, stages, warps, BLOCK_M,
    plane-ordered x, BLOCK_K)."""
    block_n, per_sm, stages, warps, block_m, xp, block_k = config
    if x.dtype != torch.float16 or not swapped_applies(w, block_k):
        raise ValueError("the swapped kernel does not take this layer")
    m, n, k = x.shape[0], w.out_features, w.in_features
    block_m = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split, k_per_split = _split(x, w, tiles, per_sm, block_k)
    xin = plane_order(x, w, block_k) if xp else x
    atomic = split > 1
    out = _output(x, n, atomic, fp32)
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    _qmt_kernel[grid](
        xin, w.qweight, w.scales, w.zeros, out, m, n, k, k_per_split,
        xin.stride(0), xin.stride(1), *_args(w), out.stride(0), out.stride(1),
        BITS=w.bits, GROUP=w.group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ATOMIC=atomic, XP=bool(xp), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.to(x.dtype) if atomic and not fp32 else out


def dequantize(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The ``[K, N]`` weight in ``dtype``: Triton where it runs, else torch."""
    if triton is None or not (w.qweight.is_cuda or INTERPRET):
        return reference_weight(w, dtype)
    k, n = w.in_features, w.out_features
    out = torch.empty((k, n), device=w.qweight.device, dtype=dtype)
    block_n = 64
    grid = (triton.cdiv(k, w.block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        w.qweight, w.scales, w.zeros, w.g_idx, out, n, k, *_args(w), out.stride(0),
        out.stride(1), BITS=w.bits, GROUP=w.group, BLOCK_N=block_n, BLOCK_K=w.block_k,
        num_warps=4,
    )  # fmt: skip
    return out


def qmatmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W (+ bias)``: the fused kernel for few rows, dequantize + matmul for
    many; callers check :func:`available` first."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    few = x2.shape[0] <= FUSED_MAX_M
    y = fused_matmul(x2, w) if few else x2 @ dequantize(w, x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], w.out_features)


def _graph_time(calls, repeats: int = 5) -> float:
    """Seconds per call of ``calls`` (a list of closures), run inside one CUDA graph, so
    that launch overhead (as in the decode graphs) is not what is measured."""
    for c in calls:  # compile, and let a configuration that cannot run fail here
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for c in calls:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


# the configurations :func:`tune` times: (kind, BLOCK_N, per SM, stages, warps)
# (the H200 bench of 2026-12-01 chose BLOCK_N 128, 8 warps, 3 stages for every 4-bit shape
# and row count among BLOCK_N 64/128 and 3/4 stages; tiles of 32 rows were 2.2-3.0x slower
# than 16-row tiles, 64-row tiles 5.2-6.9x, hence 16-row tiles over larger M as a candidate)
MV_CANDIDATES = tuple(("mv", 64, per_sm) for per_sm in (0, 2, 4, 8))
MM_CANDIDATES = tuple(
    ("mm", 128, per_sm, 3, 8, tile_m, xp)
    for per_sm in (1, 2, 4)
    for tile_m in (16, 0)
    for xp in (0, 1)
)
# without planes (3 bits, act-order gathers) a tile gathers its words: narrower tiles and
# 2 stages fit shared memory (the 2026-12-01 bench chose BLOCK_N 32, 2 stages for 3 bits)
GATHER_CANDIDATES = tuple(
    ("mm", bn, per_sm, 2, 4, tile_m, 0)
    for bn in (32, 64)
    for per_sm in (2, 4)
    for tile_m in (16, 0)
)

# the swapped-operand tiles (:func:`_qmt_kernel`, 4/8 bits in plain groups, fp16): (kind,
# BLOCK_N, per SM, stages, warps, BLOCK_M (0: 16/32/64 by rows), plane-ordered x, BLOCK_K).
# bench/kernel_variants.py timed 72-144 of them per shape and row count on an H200
# (2026-12-02, bench/results/kernel-variants-8b-h200-2026-12-02.txt); the first five, chosen
# greedily, come within 0.3% of the best of all of them summed over Llama-3-8B's four
# shapes at 1, 16 and 32 rows (329.6 against 328.6 us), and beat every mm/mv choice
# everywhere: per decode step (32 layers) 3.03 ms against 3.83 at 1 row, 3.52 against
# 4.37 at 16 and 3.97 against 5.98 at 32.
MT_CANDIDATES = (
    ("mt", 256, 2, 3, 4, 0, 1, 128),
    ("mt", 128, 1, 3, 4, 0, 1, 256),
    ("mt", 64, 4, 3, 4, 0, 1, 128),
    ("mt", 128, 2, 3, 4, 0, 1, 256),
    ("mt", 128, 2, 3, 8, 0, 1, 128),
    # 64 rows (a step carrying new prompts; not in that search) in two 32-row tiles
    ("mt", 128, 1, 3, 4, 32, 1, 256),
)
# from 64 rows: dequantize the layer, then cuBLAS (qmatmul's path above FUSED_MAX_M)
DQ_CANDIDATES = (("dq",),)


def tune(weights: list[PackedWeight], dtype: torch.dtype = torch.float16,
         buckets: tuple[int, ...] = ROW_BUCKETS) -> dict:  # fmt: skip
    """Pick the kernel, BLOCK_N, K split, pipelining depth and warps for each distinct layer
    shape and row bucket (1: the one-row kernel or 16-row tiles, whichever is faster;
    16/32/64/256: tiles of up to 64 rows; the swapped-operand tiles where they apply; from
    64 rows also dequantize-then-cuBLAS),
    timing each configuration over up to 8 layers of that shape (distinct memory, as in a
    forward) inside a CUDA graph. Call before
    capturing the decode graphs. A configuration the GPU cannot run (too much shared
    memory) is skipped."""
    chosen: dict = {}
    by_key: dict[tuple, list[PackedWeight]] = {}
    for w in weights:
        by_key.setdefault(w.key(), []).append(w)
    for key0, group in by_key.items():
        group = group[:8]
        for rows in buckets:
            key = (*key0, rows)
            if key in _TUNED:
                continue
            x = torch.randn((rows, group[0].in_features), device=group[0].qweight.device,
                            dtype=dtype)  # fmt: skip
            times = {}
            planes = plane_order(x, group[0]) is not None
            mm = MM_CANDIDATES if planes else GATHER_CANDIDATES
            if x.dtype == torch.float16:
                mm = mm + tuple(c for c in MT_CANDIDATES if swapped_applies(group[0], c[-1]))
            if rows >= 64:
                mm = mm + DQ_CANDIDATES
            below = _TUNED.get((*key0, 64))
            if rows > 64 and below is not None:
                # the tiles' cost grows with the rows alike: the 64-row winner against "dq"
                # (timing every tile at 256 rows would add seconds to every load)
                mm = tuple(dict.fromkeys((below, *DQ_CANDIDATES)))
            for cand in (*MV_CANDIDATES, *mm) if rows == 1 else mm:
                if rows <= 16 and cand[0] == "mm" and cand[5] == 0:
                    continue  # BLOCK_M 0 picks 16 here: the same as 16
                if cand[0] == "mt" and cand[5] and rows <= cand[5]:
                    continue  # a fixed tile this large is the by-rows tile here, or wider
                kind, cfg = cand[0], tuple(cand[1:])
                calls = [partial(fused_matmul, x, w, cfg, kind, fp32=True) for w in group]
                try:
                    times[cand] = _graph_time(calls)
                except Exception as err:  # e.g. OutOfResources: not this one
                    log.info("kernel config %s %s skipped: %s", key, cand, err)
            if not times:
                raise RuntimeError(f"no kernel configuration runs for {key}")
            TIMINGS[key] = {c: round(t * 1e6, 1) for c, t in times.items()}
            best = min(times, key=times.get)
            _TUNED[key] = chosen[key] = best
            chosen[(*key, "us")] = round(times[best] * 1e6, 1)
    return chosen
