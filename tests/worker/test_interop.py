"""Interop (tier 3): GPTQModel 7.6.0, an independent loader, reads our checkpoints.

GPTQModel loads asymmetric checkpoints only as gptq_v2 (it trusts asymmetric v1 files only
from its own quantizer), so the asymmetric cases here are v2. Its pure-torch kernel
(``BACKEND.TORCH``) unpacks qweight/qzeros/scales/g_idx with its own code; logits must equal
those of our reader. Both run in fp16 on the same inputs.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.model import load_quantized_model

from .conftest import sample_ids, worker_config

pytestmark = pytest.mark.interop
if os.environ.get("CI"):  # in CI this tier must run, never skip
    import gptqmodel  # noqa: F401
else:
    pytest.importorskip("gptqmodel", reason="install the dev extra: pip install -e '.[dev]'")


@pytest.mark.parametrize(
    ("arch", "settings"),
    [
        ("llama", {"bits": 4, "group_size": 32}),
        (
            "llama",
            {
                "bits": 3,
                "group_size": 64,
                "sym": False,
                "desc_act": True,
                "checkpoint_format": "gptq_v2",
            },
        ),
        ("llama", {"bits": 8, "group_size": -1}),
        ("llama", {"bits": 2, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}),
        ("llama", {"bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}),
        ("qwen3", {"bits": 4, "group_size": 64, "desc_act": True, "static_groups": True}),
        ("gpt2", {"bits": 4, "group_size": 32}),
    ],
    ids=[
        "llama-4bit",
        "llama-3bit-asym-act",
        "llama-8bit-perchannel",
        "llama-2bit-asym",
        "llama-4bit-v2-sym",
        "qwen3-4bit-static",
        "gpt2-conv1d",
    ],
)
def test_gptqmodel_loads_checkpoint_with_same_logits(
    arch, settings, model_dir, tmp_path, calibration_file
):
    from gptqmodel import BACKEND, GPTQModel

    out = tmp_path / "ckpt"
    quantize(worker_config(model_dir(arch), out, calibration_file, **settings), show_progress=False)
    ours = load_quantized_model(out, dtype=torch.float16)
    logging.getLogger("gptqmodel").setLevel(logging.WARNING)
    theirs = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    kernel_types = {type(m).__name__ for m in theirs.model.modules()}
    assert "TorchLinear" in kernel_types  # their own unpacking code ran, not ours

    ids = sample_ids(ours.config.vocab_size)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits.float()
        got = theirs.model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
