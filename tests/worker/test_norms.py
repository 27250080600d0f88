"""The engine's fused RMSNorm (pipeline/norms.py): the kernel through Triton's interpreter
against each class's own forward, the fallback where a class computes something else, and
the modules left as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from gptq_worker.pipeline.norms import NORM_CLASSES, fuse_norms
from tests.worker.test_serve_static import _interpreted

NORMS_CHECK = r"""
import torch
from gptq_worker.kernels import decode_triton
from gptq_worker.pipeline import norms
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

calls = []
kernel = decode_triton.add_rms
decode_triton.add_rms = lambda *a, **k: (calls.append(a[0].shape), kernel(*a, **k))[1]
torch.manual_seed(0)
for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm):
    layer = torch.nn.Module()
    layer.norm = cls(96, eps=1e-5).half()
    layer.norm.weight.data = torch.randn(96).half()
    x = (torch.randn(2, 70, 96) * 3).half()  # more rows than the check's 64
    want = layer.norm(x)
    restore = norms.fuse_norms(layer)
    before = len(calls)
    got = layer.norm(x)
    assert len(calls) > before, (cls.__name__, "the kernel did not run")
    assert norms._agrees[(cls, torch.float16)], cls.__name__
    eps = torch.finfo(torch.float16).eps
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), rtol=2 * eps, atol=2 * eps), cls
    same = (got == want).float().mean().item()
    assert same > 0.99, (cls.__name__, same)
    restore()
    # bf16: the interpreter rounds fp32 to bf16 by truncation (a GPU rounds to nearest), so
    # its values may lie two units in the last place off; the arithmetic is checked here,
    # the rounding by the first-call check on the GPU
    norm = cls(96, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(96).to(torch.bfloat16)
    xb = (torch.randn(2, 70, 96) * 3).to(torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    got, want = norms._kernel(norm, xb).float(), norm(xb).float()
    assert torch.allclose(got, want, rtol=4 * eps, atol=4 * eps), (cls.__name__, "bf16")


class LlamaRMSNorm(torch.nn.Module):  # the name, with Gemma's arithmetic: (1 + weight)
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


layer = torch.nn.Module()
layer.norm = LlamaRMSNorm(96).half()
x = torch.randn(3, 96).half()
want = layer.norm(x)
norms.fuse_norms(layer)
assert torch.equal(layer.norm(x), want)  # checked, refused, its own forward
assert norms._agrees[(LlamaRMSNorm, torch.float16)] is False
print("fused norms equal", len(calls))
"""


def test_fused_norm_equals_each_classes_forward():
    """Llama, Mistral, Qwen2 and Qwen3 RMSNorm through the kernel (Triton's interpreter)
    give their class's values to rounding (fp16: 99% of elements bit for bit); a
    class of the same name with other arithmetic is caught by the first-call check and
    keeps its own forward."""
    pytest.importorskip("triton")
    out = _interpreted(NORMS_CHECK)
    assert "fused norms equal" in out


def test_fusing_leaves_the_modules_as_they_were():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert "LlamaRMSNorm" in NORM_CLASSES
    layer = torch.nn.Module()
    layer.a, layer.b = LlamaRMSNorm(8), LlamaRMSNorm(8)
    layer.other = torch.nn.LayerNorm(8)
    restore = fuse_norms(layer)
    assert "forward" in vars(layer.a) and "forward" in vars(layer.b)
    assert "forward" not in vars(layer.other)
    twin = copy.deepcopy(layer)  # GPTAQ's full-precision copy: bound to the copy's module
    assert twin.a.forward.__self__ is twin.a
    x = torch.randn(4, 8)  # fp32 on a CPU: the class's forward
    assert torch.equal(layer.a(x), LlamaRMSNorm.forward(layer.a, x))
    restore()
    assert "forward" not in vars(layer.a) and "forward" not in vars(layer.b)
