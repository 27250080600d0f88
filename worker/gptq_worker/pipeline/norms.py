"""RMSNorm in one kernel for the engine's decoder-layer forwards on a GPU.

transformers' RMSNorm of Llama, Mistral, Qwen2 and Qwen3 (the same ``forward`` in the
modeling files of transformers 5.17 and 5.24) computes in fp32 through five to six
kernels: the upcast, ``pow``, ``mean``, the multiplication by ``rsqrt``, the downcast and
the weight's multiplication, each reading or writing the whole ``[batch, seq, hidden]``
tensor, half of them in fp32. The engine runs a layer's forward several times over the
calibration batches (true-sequential passes, GPTAQ's second stream): for Llama-3-8B over
128 x 2048 tokens that is 224 norms per layer, and the layer trace of 2026-12-01 (one
H200, ``bench/results/speed-layer-trace-llama-3-8b-default-h200-2026-12-01-s6.txt``) has
their kernels (pow, mean, the float and half multiplications, the casts) at about 0.2 s
of the layer's 2.1 s.

:func:`fuse_norms` gives a layer's norms of those classes a forward through
``kernels/decode_triton.add_rms`` (one read of the input, one write of the output; the
same arithmetic: fp32 sum of squares, ``rsqrt``, downcast, times the weight in the input's
dtype), taken where the input is a CUDA fp16/bf16 tensor of the weight's dtype. The first
call for each class and dtype compares it with the class's own forward on the first rows
and keeps the class's forward from then on if they differ by more than rounding (a
transformers release that changed the norm's arithmetic falls back; it does not change
results).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
CHECK_ROWS = 64  # rows of the first input each class (and dtype) is checked on
_agrees: dict[tuple[type, torch.dtype], bool] = {}  # whether the kernel gave the class's values


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _usable(norm: nn.Module, x: torch.Tensor) -> bool:
    from gptq_worker.kernels import gptq_triton as kernels

    return (
        kernels.triton is not None
        and (x.is_cuda or kernels.INTERPRET)
        and x.dtype in (torch.float16, torch.bfloat16)
        and norm.weight.dtype == x.dtype
        and norm.weight.device == x.device
        and x.numel() > 0
    )


def _kernel(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from gptq_worker.kernels import decode_triton

    rows = x.contiguous().view(-1, x.shape[-1])
    out = torch.empty_like(rows)
    decode_triton.add_rms(rows, None, norm.weight, _eps(norm), out)
    return out.view(x.shape)


def _agrees_with_class(norm: nn.Module, x: torch.Tensor) -> bool:
    cls = type(norm)
    key = (cls, x.dtype)  # per dtype: fp16 and bf16 round differently
    if key not in _agrees:
        sample = x.reshape(-1, x.shape[-1])[:CHECK_ROWS]
        want = cls.forward(norm, sample).float()
        got = _kernel(norm, sample).float()
        eps = torch.finfo(x.dtype).eps
        _agrees[key] = bool(
            want.shape == got.shape and torch.allclose(got, want, rtol=2 * eps, atol=2 * eps)
        )
        if not _agrees[key]:
            log.warning(
                "%s: the fused RMSNorm differs from this transformers' forward (max %.3g); "
                "its own forward is used",
                cls.__name__,
                (got - want).abs().max().item() if want.shape == got.shape else float("nan"),
            )
    return _agrees[key]


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if _usable(self, hidden_states) and _agrees_with_class(self, hidden_states):
        return _kernel(self, hidden_states)
    return type(self).forward(self, hidden_states)


def warm_up(device: torch.device, hidden: int, dtype: torch.dtype) -> None:
    """Compile (or load from Triton's cache) the fused norm's kernel for rows of ``hidden``
    values in ``dtype`` now, e.g. in the engine's warm-up: a worker pod starts with an empty
    Triton cache, and the first layer's first norm would compile it otherwise."""
    from gptq_worker.kernels import gptq_triton as kernels

    half = dtype in (torch.float16, torch.bfloat16)
    if kernels.triton is None or device.type != "cuda" or not half:
        return
    from gptq_worker.kernels import decode_triton

    x = torch.ones(2, hidden, dtype=dtype, device=device)
    decode_triton.add_rms(x, None, torch.ones(hidden, dtype=dtype, device=device), 1e-6, x.clone())


def fuse_norms(layer: nn.Module) -> Callable[[], None]:
    """Give ``layer``'s RMSNorms of :data:`NORM_CLASSES` the fused forward (an attribute of
    each module, in front of its class's; ``copy.deepcopy`` of the layer carries it, bound
    to the copy); returns the function that takes it away again."""
    fused = []
    for module in layer.modules():
        if type(module).__name__ in NORM_CLASSES and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused.append(module)

    def restore() -> None:
        for module in fused:
            vars(module).pop("forward", None)

    return restore
