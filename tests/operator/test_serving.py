"""Kernel choice (docs/serving-compatibility.md) and tensor-parallel sizing, as pure functions."""

from __future__ import annotations

import pytest

from gptq_operator.api import CheckpointSummary
from gptq_operator.serving import Incompatible, choose, tensor_parallel

W4G128 = CheckpointSummary(
    bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq"
)
EVERYTHING = [
    "vllm/gptq_marlin",
    "vllm/machete",
    "vllm/gptq",
    "lmdeploy/turbomind",
    "builtin/torch",
]
CLUSTER = [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0)]


@pytest.mark.parametrize(
    ("backend", "sms", "kernel"),
    [
        ("auto", CLUSTER, "vllm/machete"),  # an H100 is there: fastest first
        ("auto", [(8, 0), (8, 9)], "vllm/gptq_marlin"),
        ("auto", [(7, 5)], "lmdeploy/turbomind"),  # Marlin needs SM 8.0 (older vLLM)
        ("vllm", [(7, 5)], "vllm/gptq"),
        ("lmdeploy", CLUSTER, "lmdeploy/turbomind"),
        ("builtin", [], "builtin/torch"),
    ],
)
def test_kernel_choice_follows_the_cluster(backend, sms, kernel):
    assert choose(backend, W4G128, EVERYTHING, sms).kernel == kernel


def test_choice_respects_what_the_checkpoint_allows():
    asym_3bit = CheckpointSummary(
        bits=3, group_size=128, desc_act=True, sym=False, checkpoint_format="gptq"
    )
    loadable = ["vllm/gptq", "builtin/torch"]  # what validate found for such a checkpoint
    assert choose("auto", asym_3bit, loadable, CLUSTER).kernel == "vllm/gptq"
    with pytest.raises(Incompatible) as err:
        choose("lmdeploy", asym_3bit, loadable, CLUSTER)
    message = str(err.value)
    assert "3-bit (needs 4)" in message and "desc_act (act-order) is not supported" in message
    with pytest.raises(Incompatible, match="no node has a GPU with the SM it needs"):
        choose("lmdeploy", W4G128, EVERYTHING, [(9, 0)])  # TurboMind stops at 8.9 here


@pytest.mark.parametrize(
    ("size_gb", "gpu_mib", "tp"),
    [(5.7, [81920], 1), (40, [81920], 1), (40, [15360], 8), (140, [81920], 4), (None, [], 1)],
)
def test_auto_tensor_parallel_fits_weights_with_headroom(size_gb, gpu_mib, tp):
    size = int(size_gb * 1e9) if size_gb else None
    assert tensor_parallel("auto", size, gpu_mib) == tp
    assert tensor_parallel(2, size, gpu_mib) == 2


def test_builtin_pods_run_a_command_the_worker_accepts():
    """The Deployment's args parse with ``gptq-worker serve``'s own parser; probes match."""
    from gptq_operator.api import QuantizedModelSpec
    from gptq_operator.manifests import Owner
    from gptq_operator.serving import Choice, deployment
    from gptq_operator.settings import OperatorSettings
    from gptq_worker.cli import parser as _parser

    spec = QuantizedModelSpec.model_validate(
        {"source": {"uri": "pvc://models/tiny-w4g128"}, "backend": "builtin"}
    )
    owner = Owner("tiny", "ml", "uid-1", kind="QuantizedModel")
    choice = Choice("builtin", "builtin/torch", None, None)
    settings = OperatorSettings.from_env({})
    manifest = deployment(owner, spec, choice, "pvc://models/tiny-w4g128", W4G128, 1, settings)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    args = _parser().parse_args(container["args"])
    assert args.command == "serve"
    assert (args.host, args.port, args.served_model_name) == ("0.0.0.0", 8080, "tiny")
    assert args.checkpoint.endswith("/models/tiny-w4g128")
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == settings.worker_image
