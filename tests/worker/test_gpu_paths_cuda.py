"""The GPU-only paths that the CPU tests reach through stand-ins (CUDA only: skipped where
no GPU is present, as in CI; run on a GPU machine): the Hessians' products added in the
tensor cores' epilogue, the engine's fused RMSNorm with the GPU's rounding, and the
serving kernels' dequantize-then-cuBLAS choice."""

from __future__ import annotations

import pytest
import torch

from gptq_compat.config import CheckpointFormat
from gptq_worker.kernels import gptq_triton as kernels
from gptq_worker.pipeline import norms
from gptq_worker.quant import hessian
from gptq_worker.quant.hessian import AsymmetricHessian, Hessian
from tests.worker.kernel_cases import layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = torch.device("cuda")


@pytest.mark.parametrize("width", [512, 8192])  # whole, and lower-triangle blocks
def test_tensor_core_hessians_are_the_products_sums(width):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = AsymmetricHessian(width, GPU)
    xs = [torch.randn(2, 300, width, device=GPU, generator=g).half() for _ in range(3)]
    fps = [x + 0.01 * torch.randn(x.shape, device=GPU, generator=g).half() for x in xs]
    for x, fp in zip(xs, fps, strict=True):
        h.add_pair(x, fp)
    rows = torch.cat([x.reshape(-1, width) for x in xs]).double()
    diff = torch.cat([(fp - x).reshape(-1, width) for x, fp in zip(xs, fps, strict=True)])
    want_h = 2 / 6 * rows.t() @ rows
    want_cross = 2 / 6 * diff.double().t() @ rows
    got_h, got_cross = h.result().double(), h.cross_result().double()
    assert ((got_h - want_h).norm() / want_h.norm()).item() < 2e-4
    assert ((got_cross - want_cross).norm() / want_cross.norm()).item() < 2e-3
    plain = Hessian(width, GPU)
    for x in xs:
        plain.add(x)
    assert torch.equal(plain.result(), got_h.float())  # the same sums with or without GPTAQ
    assert hessian._has_addmm_dtype(0), "this torch adds the products in two steps"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_norm_on_the_gpu_rounds_as_transformers_does(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = torch.nn.Module()
    module.norm = LlamaRMSNorm(4096, eps=1e-5).to(GPU, dtype)
    module.norm.weight.data = torch.randn(4096, device=GPU).to(dtype)
    x = (torch.randn(4, 512, 4096, device=GPU) * 2).to(dtype)
    want = module.norm(x)
    restore = norms.fuse_norms(module)
    got = module.norm(x)
    restore()
    assert norms._agrees[(LlamaRMSNorm, dtype)]
    assert (got == want).float().mean().item() > 0.99
    eps = torch.finfo(dtype).eps
    assert torch.allclose(got.float(), want.float(), rtol=2 * eps, atol=2 * eps)


def test_dequantize_then_cublas_is_the_product():
    w, expected = layer(4, True, False, CheckpointFormat.GPTQ, k=1024, n=512, group=128)
    w = kernels.PackedWeight(
        w.qweight.to(GPU), w.zeros.to(GPU), w.scales.to(GPU), w.g_idx.to(GPU), w.bits
    )
    x = torch.randn(200, 1024, device=GPU).half()
    got = kernels.fused_matmul(x, w, kind="dq", fp32=True)
    want = x.float() @ expected.t().to(GPU).half().float()
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 2e-3


def test_the_device_memory_metric_reads_torchs_allocator():
    from prometheus_client import generate_latest

    from gptq_worker.serve.metrics import ServeMetrics

    metrics = ServeMetrics("m")
    assert metrics.watch_device(GPU)
    held = torch.empty(64 << 20, dtype=torch.uint8, device=GPU)
    text = generate_latest(metrics.registry).decode()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith('gptq_serve_device_memory_bytes{kind="allocated"}')
    )
    assert float(line.split()[-1]) >= held.numel()
