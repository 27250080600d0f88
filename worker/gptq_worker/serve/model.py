"""The model that ``gptq-worker serve`` (and ``eval``) runs: a checkpoint rebuilt with packed
:class:`QuantLinear` modules, weights kept as int32 words and dequantized in each forward.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptq_compat.config import CheckpointFormat
from gptq_worker.format.checkpoint import QUANT_SUFFIXES, load_tensors, read_quantize_config
from gptq_worker.format.pack import pack_qzeros, pack_rows, unpack_qzeros, unpack_rows
from gptq_worker.kernels import gptq_triton as kernels
from gptq_worker.serve.generate import Engine

log = logging.getLogger(__name__)
KERNEL = "builtin/torch"  # dequantize in torch, then matmul (CPU, or no Triton)
CPU_INT4_KERNEL = "builtin/torch-int4"  # torch's int4 CPU matmul (4-bit layers, bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRITON_KERNEL = "builtin/triton"  # fused dequantize-and-multiply (kernels/gptq_triton.py)


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed in memory and is dequantized in each forward.

    On a GPU with Triton the forward is the fused kernel of ``kernels/gptq_triton.py``;
    elsewhere the portable torch path: correct on any device, not fast. ``qweight`` stays packed
    (``bits/16`` of the fp16 weight); zero points are kept unpacked, one small
    ``[groups, out]`` tensor in the scales' dtype, so each forward only unpacks codes.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        fmt: CheckpointFormat,
    ) -> None:
        super().__init__()
        self.bits, self.fmt = bits, fmt
        self.in_features, self.out_features = g_idx.shape[0], scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", bias)
        zeros = unpack_qzeros(qzeros, bits, self.out_features, fmt)
        self.register_buffer("zeros", zeros.to(scales.dtype), persistent=False)
        pf = 32 // bits if 32 % bits == 0 else 0
        shifts = torch.arange(pf, dtype=torch.int32) * bits if pf else torch.zeros(0)
        self.register_buffer("shifts", shifts.view(1, -1, 1), persistent=False)

    def codes(self) -> torch.Tensor:
        """``[in, out]`` integer codes, unpacked from ``qweight``."""
        if self.shifts.numel() == 0:  # 3-bit: values straddle words
            return unpack_rows(self.qweight, self.bits, self.in_features)
        words = self.qweight.unsqueeze(1)  # [in/pf, 1, out]
        values = torch.bitwise_right_shift(words, self.shifts) & (2**self.bits - 1)
        return values.reshape(self.in_features, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` weight: ``scale[g] * (code - zero[g])``, computed in ``dtype``."""
        g = self.g_idx.long()
        w = (self.codes().to(dtype) - self.zeros.to(dtype)[g]) * self.scales.to(dtype)[g]
        return w.t()

    def widen(self) -> int:
        """Hold 2- or 3-bit codes as 4-bit words: the same codes, zero points and scales,
        so the same weight, in the layout the GPU's fastest kernels read (4-bit planes; 3-bit
        values straddle words and 2-bit ones have no plane kernel, so the kernels gather
        them). Costs a third (3 bits) or all (2 bits) of the codes' memory more; returns the
        bytes added (0: not a 2/3-bit layer)."""
        if self.bits not in (2, 3):
            return 0
        before = self.qweight.numel() * self.qweight.element_size()
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features, self.fmt)
        self.qweight = pack_rows(self.codes(), 4)
        self.qzeros = pack_qzeros(zeros, 4, self.fmt)  # what reads qzeros reads it at 4 bits
        self.bits = 4
        self.shifts = (torch.arange(8, dtype=torch.int32, device=self.qweight.device) * 4).view(
            1, -1, 1
        )
        self._packed = None
        return self.qweight.numel() * self.qweight.element_size() - before

    def packed(self) -> kernels.PackedWeight:
        """The kernels' view of this layer (rebuilt if its tensors were replaced or moved)."""
        p = getattr(self, "_packed", None)
        if p is None or p.qweight is not self.qweight or p.scales is not self.scales:
            p = kernels.PackedWeight(self.qweight, self.zeros, self.scales, self.g_idx, self.bits)
            self._packed = p
        return p

    def cpu_int4(self):
        """(packed weight, group size, scales-and-offsets, input permutation or None) for
        torch's int4 CPU matmul, built once, or None where it does not apply: 4 bits, groups
        of 32/64/128/256 (act-order too: its inputs are permuted so that each group's
        columns are contiguous), ``in_features`` a multiple of the group and of 16,
        ``out_features`` of 64 (the op's layout).

        torch computes ``(code - 8) * scale + offset`` per group; GPTQ's ``(code - zero) *
        scale`` is that with ``offset = (8 - zero) * scale``.
        """
        cached = getattr(self, "_int4", None)
        if cached is not None or getattr(self, "_int4_none", False):
            return cached
        self._int4_none = True
        op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        groups = self.scales.shape[0]
        k, n = self.in_features, self.out_features
        if op is None or self.bits != 4 or self.qweight.is_cuda or k % groups:
            return None
        size = k // groups
        if size not in (32, 64, 128, 256) or k % 16 or n % 64:
            return None
        g = self.g_idx.long()
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(k) // size):
            return None  # a group without exactly ``size`` columns
        codes = self.codes()  # [in, out]
        plain = torch.equal(perm, torch.arange(k))
        if not plain:
            codes = codes[perm]
        scales = self.scales.float()
        offsets = (8 - self.zeros.float()) * scales
        sz = torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous()
        # torch's packing has changed between releases: one probe row against the
        # dequantized weight decides, once, whether this torch's op reads what we packed
        probe = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
        expected = probe @ self.dequantized_weight(torch.float32).t()
        try:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
            x = probe[:, perm] if not plain else probe
            got = op(x.to(torch.bfloat16).contiguous(), w, size, sz).float()
            ok = ((got - expected).norm() / expected.norm()).item() < 2e-2
        except (RuntimeError, TypeError, ValueError) as err:
            log.info("torch's int4 CPU matmul is not used: %s", err)
            return None
        if not ok:
            log.warning("torch's int4 CPU matmul disagrees with the dequantized weight; not used")
            return None
        self._int4 = (w, size, sz, None if plain else perm)
        self._int4_none = False
        return self._int4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and kernels.available(x):
            return kernels.qmatmul(x, self.packed(), self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype == torch.bfloat16 and not x.is_cuda:
            int4 = self.cpu_int4()
            if int4 is not None:  # torch's int4 CPU kernel: no dequantized weight
                w, size, sz, perm = int4
                x2 = x.reshape(-1, self.in_features)
                if perm is not None:
                    x2 = x2.index_select(1, perm)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w, size, sz)
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y if bias is None else y + bias
        # fp16 * fp16 rounds exactly like the fp32 product cast to fp16; bf16 would not
        exact = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
        return F.linear(x, self.dequantized_weight(exact).to(x.dtype), bias)

    def packed_bytes(self) -> int:
        """Bytes this module keeps for its weight (packed codes, scales, zeros, g_idx)."""
        tensors = (self.qweight, self.scales, self.zeros, self.g_idx)
        return sum(t.numel() * t.element_size() for t in tensors)


def load_quantized_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild a causal LM from a GPTQ checkpoint with :class:`QuantLinear` modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    qcfg = read_quantize_config(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized modules ourselves
    with _no_init():  # the dense weights are replaced at once: never fill them
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    tensors = load_tensors(directory)
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    for prefix in prefixes:
        settings = qcfg.for_module(prefix)
        if settings is None:
            raise ValueError(f"{prefix} is packed but 'dynamic' says it is not quantized")
        parent, _, child = prefix.rpartition(".")
        module = QuantLinear(
            *(tensors.pop(f"{prefix}.{s}") for s in QUANT_SUFFIXES),
            bias=tensors.pop(f"{prefix}.bias", None),
            bits=settings.bits,
            fmt=qcfg.checkpoint_format,
        )
        setattr(model.get_submodule(parent) if parent else model, child, module)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has tensors the model does not: {result.unexpected_keys}")
    model.tie_weights()
    packed_buffers = {f"{p}.{s}" for p in prefixes for s in (*QUANT_SUFFIXES, "bias")}
    still_missing = [
        k for k in result.missing_keys if k not in packed_buffers and not _is_tied(model, k)
    ]
    if still_missing:
        raise ValueError(f"checkpoint lacks tensors: {still_missing}")
    # a served model needs no gradients: with them, a forward outside inference mode
    # records an autograd graph, and an in-place write into a cache chains every such
    # graph onto the cache for as long as it lives
    return model.to(device).eval().requires_grad_(False)


def _no_init():
    """transformers' context that skips random initialisation (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _is_tied(model: nn.Module, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.startswith("lm_head")
        and (out.weight is model.get_input_embeddings().weight)
    )


WIDEN_MAX_SHARE_OF_FREE = 0.25  # auto: widen 2/3-bit codes when the extra bytes fit in ...
WIDEN_MAX_SHARE_OF_CARD = 0.05  # ... a quarter of the free memory (and of a GPU, a twentieth)


def widen_codes(layers: list[QuantLinear], device: torch.device, dtype: torch.dtype) -> int:
    """Hold the 2- and 3-bit layers' codes as 4-bit words (:meth:`QuantLinear.widen`) where
    that buys speed and memory allows; returns the bytes added (0: not widened).

    ``GPTQ_SERVE_WIDEN_CODES``: ``auto`` (the default) widens when the extra bytes (an
    eighth of a byte per weight at 3 bits, a quarter at 2) stay within
    :data:`WIDEN_MAX_SHARE_OF_FREE` of the free memory, and on a GPU (with the fused
    kernels, fp16/bf16) also within :data:`WIDEN_MAX_SHARE_OF_CARD` of the card, so a model
    that was quantized to few bits to fit keeps its footprint; ``1`` always, ``0`` never.
    On a CPU, 4-bit words unpack with one vectorised shift instead of 3-bit values gathered
    across words (the tiny CPU bench: 21 to 33 tokens/s at batch 1), and in bfloat16 they
    reach torch's int4 kernel. The weights are the same either way."""
    narrow = [m for m in layers if m.bits in (2, 3)]
    setting = os.environ.get("GPTQ_SERVE_WIDEN_CODES", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"GPTQ_SERVE_WIDEN_CODES must be auto, 0 or 1, not {setting!r}")
    if not narrow or setting == "0":
        return 0
    if setting == "auto":
        extra = sum(
            m.qweight.numel() * m.qweight.element_size() * (4 - m.bits) // m.bits for m in narrow
        )
        if device.type == "cuda":
            if kernels.triton is None or dtype == torch.float32:
                return 0  # the torch path: nothing reads 4-bit planes faster there
            free, total = torch.cuda.mem_get_info(device)
            room = min(free * WIDEN_MAX_SHARE_OF_FREE, total * WIDEN_MAX_SHARE_OF_CARD)
        else:
            from gptq_worker.serve.batch import available_host_bytes

            free = available_host_bytes()
            room = free * WIDEN_MAX_SHARE_OF_FREE
        if extra > room:
            log.info(
                "2/3-bit codes kept as they are: widening them would take %.0f MiB of %.0f free",
                extra / 2**20,
                free / 2**20,
            )
            return 0
    added = sum(m.widen() for m in narrow)
    log.info("2/3-bit codes held as 4-bit words for the fused kernels: +%.0f MiB", added / 2**20)
    return added


class CheckpointRejected(ValueError):
    """``validate`` rejects the checkpoint, so serving it would answer garbage or errors."""


@dataclass
class Loaded:
    engine: Engine
    tokenizer: Any
    name: str
    info: dict[str, str]
    packed_bytes: int
    fp16_bytes: int
    created: int


def load(
    checkpoint: str | Path,
    name: str,
    device: str,
    max_batch: int,
    max_queue: int,
    trust_remote_code: bool = False,
    kv_cache_tokens: int | None = None,
    runtime: str = "auto",
    dtype: torch.dtype | str | None = None,
) -> Loaded:
    """``dtype``: the serving dtype (None or "auto": fp16 on a GPU, fp32 on a CPU); on a
    CPU, bfloat16 runs 4-bit layers on torch's int4 kernel (:meth:`QuantLinear.cpu_int4`)."""
    from transformers import AutoTokenizer

    from gptq_worker.device import resolve_device
    from gptq_worker.format.validate import validate_checkpoint

    directory = Path(checkpoint)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json)")
    report = validate_checkpoint(directory)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise CheckpointRejected(
            f"it failed validation: {report.errors[0]}{more}; run "
            f"'gptq-worker validate {directory}' for the full report"
        )
    qcfg = read_quantize_config(directory)
    dev = resolve_device(device)
    if dtype in (None, "auto"):
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model = load_quantized_model(directory, dtype, str(dev), trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    widened = widen_codes(layers, dev, dtype)  # before the KV cache is sized from free memory
    packed = sum(m.packed_bytes() for m in layers)
    fp16 = sum(m.in_features * m.out_features * 2 for m in layers)
    info = {
        "model": name,
        "bits": str(qcfg.bits),
        "group_size": str(qcfg.group_size),
        "desc_act": str(qcfg.desc_act).lower(),
        "sym": str(qcfg.sym).lower(),
        "format": qcfg.checkpoint_format.value,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
    }
    engine = Engine(
        model,
        tokenizer,
        dev,
        max_batch=max_batch,
        max_queue=max_queue,
        kv_cache_tokens=kv_cache_tokens,
        runtime=runtime,
    )
    fused = dev.type == "cuda" and kernels.triton is not None and dtype != torch.float32
    int4 = dev.type == "cpu" and dtype == torch.bfloat16 and any(m.cpu_int4() for m in layers)
    info["kernel"] = TRITON_KERNEL if fused else CPU_INT4_KERNEL if int4 else KERNEL
    info["runtime"] = engine.runtime + (" (CUDA graphs)" if engine.runtime == "static" and
                                        dev.type == "cuda" else "")  # fmt: skip
    if widened:
        info["codes_in_memory"] = (
            f"{qcfg.bits}-bit codes held as 4-bit words (+{widened / 2**20:.1f} MiB)"
        )
    return Loaded(engine, tokenizer, name, info, packed, fp16, int(time.time()))
