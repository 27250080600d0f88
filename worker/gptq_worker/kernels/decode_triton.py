"""Fused kernels for one Llama decode step (``serve/static.py``), so that a step is ~13
kernels a layer instead of ~50 small torch ops (each a few microseconds even inside a
CUDA graph):

- :func:`add_rms`: ``h += d`` (the previous matmul's fp32 output) and ``x = RMSNorm(h)``;
- :func:`rope_kv`: RoPE on q and k of the fused qkv output, k and v written into the
  static cache at each row's position;
- :func:`attention`: grouped-query attention of one new token per row over its cache up
  to its own position (online softmax, tensor cores for the G query heads of a KV head;
  the context split into chunks across programs, then joined, where the cache is long);
- :func:`silu_mul`: ``silu(gate) * up`` of the fused gate/up output.

Each has a torch reference (``*_reference``) with the same meaning; the CPU tests run the
Triton kernels through ``TRITON_INTERPRET=1`` against them, and the GPU bench compares a
whole fused decode step with the torch step.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _add_rms_kernel(h_ptr, d_ptr, w_ptr, x_ptr, N, eps, HAS_D: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        r = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < N
        h = tl.load(h_ptr + r * N + c, mask=m, other=0.0)
        if HAS_D:
            d = tl.load(d_ptr + r * N + c, mask=m, other=0.0)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + r * N + c, h, mask=m)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / N
        xn = (hf * tl.rsqrt(var + eps)).to(h_ptr.dtype.element_ty)
        # the weight's product in fp32: exact for two fp16 or bf16 factors, so rounded once
        # it is torch's fp16/bf16 product (and Triton's interpreter has no bf16 arithmetic)
        w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + r * N + c, (w * xn.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kv_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
                        sxb, sqb, sqh, skb, skh, skl, scs, H, KVH,
                        HALF: tl.constexpr):  # fmt: skip
        b = tl.program_id(0)  # a token: its cache row is slot[b], its position pos[b]
        j = tl.program_id(1)  # q heads, then k heads, then v heads
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b)
        d = tl.arange(0, HALF)
        base = qkv_ptr + b * sxb + j * 2 * HALF
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        if j < H + KVH:
            c = tl.load(cos_ptr + pos * scs + d).to(tl.float32)
            s = tl.load(sin_ptr + pos * scs + d).to(tl.float32)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            if j < H:
                dst = q_ptr + b * sqb + j * sqh
                tl.store(dst + d, o1.to(q_ptr.dtype.element_ty))
                tl.store(dst + HALF + d, o2.to(q_ptr.dtype.element_ty))
            else:
                dst = k_ptr + slot * skb + (j - H) * skh + pos * skl
                tl.store(dst + d, o1.to(k_ptr.dtype.element_ty))
                tl.store(dst + HALF + d, o2.to(k_ptr.dtype.element_ty))
        else:
            dst = v_ptr + slot * skb + (j - H - KVH) * skh + pos * skl
            tl.store(dst + d, x1.to(v_ptr.dtype.element_ty))
            tl.store(dst + HALF + d, x2.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _attend_block(q, k_ptr, v_ptr, base, cols, valid, d, skl, scale, m_i, l_i, acc):
        # one block of cache columns folded into the online softmax of the G query heads:
        # scores on the tensor cores, running max and sum rescaled, values accumulated
        offs = base + cols[:, None] * skl + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, out_ptr, scale,
                          sqb, sqh, skb, skh, skl, sob,
                          G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                          BLOCK_L: tl.constexpr):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b)
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        gm = g < G
        heads = kvh * G + g
        q = tl.load(
            q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=gm[:, None], other=0.0
        )
        m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GP,), dtype=tl.float32)
        acc = tl.zeros((GP, HD), dtype=tl.float32)
        base = slot * skb + kvh * skh
        for l0 in range(0, pos + 1, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            valid = cols <= pos
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, cols, valid, d, skl, scale,
                                          m_i, l_i, acc)  # fmt: skip
        out = acc / l_i[:, None]
        dst = out_ptr + b * sob + heads[:, None] * HD + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=gm[:, None])

    @triton.jit
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
                                scale, sqb, sqh, skb, skh, skl, H, SPLITS,
                                G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                                BLOCK_L: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        # one chunk of CHUNK cache columns of one token's KV head: the online softmax's
        # running max, sum and weighted values over that chunk (nothing where the chunk
        # starts past the token's position); _attention_combine_kernel joins the chunks
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        pos = tl.load(pos_ptr + b)
        start = s * CHUNK
        if start <= pos:
            slot = tl.load(slot_ptr + b)
            g = tl.arange(0, GP)
            d = tl.arange(0, HD)
            gm = g < G
            heads = kvh * G + g
            q = tl.load(
                q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=gm[:, None], other=0.0
            )
            m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((GP,), dtype=tl.float32)
            acc = tl.zeros((GP, HD), dtype=tl.float32)
            base = slot * skb + kvh * skh
            end = tl.minimum(start + CHUNK, pos + 1)
            for l0 in range(start, end, BLOCK_L):
                cols = l0 + tl.arange(0, BLOCK_L)
                valid = cols < end
                m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, cols, valid, d, skl,
                                              scale, m_i, l_i, acc)  # fmt: skip
            part = (b * H + heads) * SPLITS + s
            tl.store(m_ptr + part, m_i, mask=gm)
            tl.store(l_ptr + part, l_i, mask=gm)
            tl.store(acc_ptr + part[:, None] * HD + d[None, :], acc, mask=gm[:, None])

    @triton.jit
    def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr, sob, H, SPLITS,
                                  HD: tl.constexpr, SP: tl.constexpr,
                                  CHUNK: tl.constexpr):  # fmt: skip
        # one token's query head from its chunks, each weighted by exp(its max - the max
        # over the chunks); only the chunks up to the token's position
        b = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + b)
        s = tl.arange(0, SP)
        sm = s < (pos // CHUNK + 1)
        part = (b * H + h) * SPLITS + s
        m = tl.load(m_ptr + part, mask=sm, other=float("-inf"))
        top = tl.max(m, axis=0)  # finite: chunk 0 always holds column 0
        w = tl.where(sm, tl.exp(m - top), 0.0)
        total = tl.sum(tl.load(l_ptr + part, mask=sm, other=0.0) * w, axis=0)
        d = tl.arange(0, HD)
        acc = tl.load(acc_ptr + part[:, None] * HD + d[None, :], mask=sm[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / total
        tl.store(out_ptr + b * sob + h * HD + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < INTER
        g = tl.load(gu_ptr + r * 2 * INTER + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + r * 2 * INTER + INTER + c, mask=m, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + r * INTER + c, y.to(out_ptr.dtype.element_ty), mask=m)


# -- launchers --------------------------------------------------------------------------


def add_rms(h: torch.Tensor, d: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor) -> None:  # fmt: skip
    """``h += d`` (in place, if ``d``), ``out = weight * rms_normalise(h)``; rows contiguous."""
    rows, n = h.shape
    _add_rms_kernel[(rows,)](
        h, d if d is not None else h, weight, out, n, eps, HAS_D=d is not None,
        BLOCK=triton.next_power_of_2(n), num_warps=8,
    )  # fmt: skip


def rope_kv(qkv, q, keys, values, cos, sin, positions, heads: int, kv_heads: int,
            slots=None) -> None:  # fmt: skip
    """q heads of ``qkv [tokens, (H+2KV)*hd]`` roped into ``q [tokens, H, hd]``; k (roped)
    and v written into ``keys``/``values [slots, KV, S, hd]`` at each token's cache row
    ``slots[t]`` (default: row ``t``) and position."""
    rows = qkv.shape[0]
    hd = q.shape[-1]
    if slots is None:
        slots = torch.arange(rows, device=qkv.device, dtype=positions.dtype)
    _rope_kv_kernel[(rows, heads + 2 * kv_heads)](
        qkv, q, keys, values, cos, sin, positions, slots, qkv.stride(0), q.stride(0),
        q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), cos.stride(0), heads, kv_heads,
        HALF=hd // 2, num_warps=1,
    )  # fmt: skip


def split_chunk(capacity: int) -> int:
    """Cache columns per program of the split attention for a cache of ``capacity``
    columns (at most :data:`MAX_SPLITS` chunks, at least 64 columns each), or 0: one
    program per token and KV head (``GPTQ_SERVE_SPLIT_ATTENTION=0``, or a cache of one
    chunk)."""
    if os.environ.get("GPTQ_SERVE_SPLIT_ATTENTION", "1") == "0":
        return 0
    chunk = max(64, triton.next_power_of_2(triton.cdiv(capacity, MAX_SPLITS)))
    return chunk if capacity > chunk else 0


MAX_SPLITS = 32


def attention(q, keys, values, positions, out, scale: float, slots=None) -> None:
    """``out [tokens, H*hd]``: each token's query heads over its cache row's (``slots[t]``,
    default ``t``) columns ``0..pos``: one new token of a decoding row, or one of a prompt
    whose earlier tokens' keys are already written.

    With a cache of more than one chunk (:func:`split_chunk`) the columns are split
    across programs (one per token, KV head and chunk; chunks past a token's position do
    nothing) and a second kernel joins the chunks: a token's attention then takes about
    one chunk's time instead of one program walking its whole context, which at one row
    (8 programs for Llama-3-8B's 8 KV heads) leaves most of the GPU idle."""
    rows, heads, hd = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if slots is None:
        slots = torch.arange(rows, device=q.device, dtype=positions.dtype)
    chunk = split_chunk(keys.shape[2])
    if chunk:
        splits = triton.cdiv(keys.shape[2], chunk)
        m = torch.empty((rows, heads, splits), device=q.device, dtype=torch.float32)
        total = torch.empty_like(m)
        acc = torch.empty((rows, heads, splits, hd), device=q.device, dtype=torch.float32)
        _attention_split_kernel[(rows, kv_heads, splits)](
            q, keys, values, positions, slots, m, total, acc, scale, q.stride(0), q.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2), heads, splits, G=group,
            GP=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_L=64, CHUNK=chunk,
            num_warps=4,
        )  # fmt: skip
        _attention_combine_kernel[(rows, heads)](
            m, total, acc, positions, out, out.stride(0), heads, splits, HD=hd,
            SP=triton.next_power_of_2(splits), CHUNK=chunk, num_warps=4,
        )  # fmt: skip
        return
    _attention_kernel[(rows, kv_heads)](
        q, keys, values, positions, slots, out, scale, q.stride(0), q.stride(1), keys.stride(0),
        keys.stride(1), keys.stride(2), out.stride(0), G=group,
        GP=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_L=64, num_warps=4,
    )  # fmt: skip


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    rows, two = gate_up.shape
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(two // 2, block))](gate_up, out, two // 2, BLOCK=block)


# -- torch references -------------------------------------------------------------------


def add_rms_reference(h, d, weight, eps):
    """Returns (new h, x) without touching ``h``."""
    if d is not None:
        h = (h.float() + d.float()).to(h.dtype)
    hf = h.float()
    xn = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h, weight * xn


def rope_kv_reference(qkv, cos, sin, positions, heads, kv_heads, hd):
    """(q [rows, H, hd], k [rows, KV, hd], v [rows, KV, hd]) as the kernel computes them."""
    rows = qkv.shape[0]
    x = qkv.float().view(rows, heads + 2 * kv_heads, hd)
    c = cos[positions].float()[:, None, : hd // 2]
    s = sin[positions].float()[:, None, : hd // 2]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    roped = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return roped[:, :heads], roped[:, heads : heads + kv_heads], x[:, heads + kv_heads :]


def attention_reference(q, keys, values, positions, scale, slots=None):
    rows, heads, hd = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty(rows, heads * hd, dtype=torch.float32, device=q.device)
    for b in range(rows):
        n = int(positions[b]) + 1
        r = b if slots is None else int(slots[b])
        k = keys[r, :, :n].float().repeat_interleave(heads // kv_heads, 0)  # [H, n, hd]
        v = values[r, :, :n].float().repeat_interleave(heads // kv_heads, 0)
        p = torch.softmax((q[b].float()[:, None, :] @ k.transpose(-1, -2)) * scale, -1)
        out[b] = (p @ v).reshape(-1)
    return out


def silu_mul_reference(gate_up):
    g, u = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u
