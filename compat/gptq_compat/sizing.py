"""The worker's host memory from the model's size (docs/operations.md, "Sizing the worker").

One formula for both sides: the operator requests :func:`worker_memory` for a worker pod
whose QuantizationJob sets no ``resources.memory``, and the worker refuses to start on a
GPU when its container's memory limit is below :func:`expected_peak_bytes`. The worker
streams a model from local safetensors one decoder layer at a time, so its peak RSS grows
slowly with the model: a fixed part (Python, torch, CUDA libraries, calibration tokens)
plus the embeddings, ``lm_head`` and two decoder layers.
"""

from __future__ import annotations

import math

GIB = 2**30
FIXED_BYTES = 7.0 * GIB  # the runtime and calibration: the line's intercept
BYTES_PER_MODEL_BYTE = 1 / 21  # layers and embeddings held at once, per byte of model
HEADROOM = 1.25


def expected_peak_bytes(model_bytes: int) -> int:
    """Peak host RSS of ``gptq-worker quantize`` on a GPU, streaming a model whose
    safetensors weights take ``model_bytes``: ``7.0 GiB + model_bytes / 21`` (the line
    through the two measurements below, without headroom)."""
    if model_bytes < 0:
        raise ValueError(f"model size must not be negative, got {model_bytes}")
    return math.ceil(FIXED_BYTES + model_bytes * BYTES_PER_MODEL_BYTE)


def worker_memory_bytes(model_bytes: int) -> int:
    """Memory to request for ``gptq-worker quantize`` on a model whose
    safetensors weights take ``model_bytes``: ``1.25 * (7.0 GiB + model_bytes / 21)``,
    rounded up to whole GiB.

    The line goes just above the peak RSS measured end to end on one H200
    (bench/results/speed-e2e-*-h200-2026-12-0[12]*.txt): 7.50 GiB for an 8B Llama (16.06 GB
    of fp16 weights), 13.18 GiB for a 70B one (141.1 GB; the peak does not grow with the
    layer count; 13.02 the day before), and 25% is added for allocator and page-cache
    slack: 10 GiB for 8B, 17 GiB for 70B. ``hf://`` models are downloaded and then
    streamed the same way; models without safetensors files are loaded whole and need
    about their own size more.
    """
    return math.ceil(HEADROOM * expected_peak_bytes(model_bytes) / GIB) * GIB


def worker_memory(model_bytes: int) -> str:
    """:func:`worker_memory_bytes` as a Kubernetes quantity (``"10Gi"``)."""
    return f"{worker_memory_bytes(model_bytes) // GIB}Gi"
