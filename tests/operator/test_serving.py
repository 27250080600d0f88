"""Kernel choice (docs/serving-compatibility.md) and tensor-parallel sizing, as pure functions."""

from __future__ import annotations

import re

import pytest

from gptq_compat.engines import UnknownEngineVersion
from gptq_operator.api import CheckpointSummary
from gptq_operator.serving import (
    Incompatible,
    choose,
    image_version,
    serving_engine,
    tensor_parallel,
)

W4G128 = CheckpointSummary(
    bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq"
)
CLUSTER = [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0)]
DEFAULT_ENGINES = {
    "vllm": serving_engine("vllm", "vllm/vllm-openai:v0.32.0"),
    "lmdeploy": serving_engine("lmdeploy", "openmmlab/lmdeploy:v0.18.0"),
    "builtin": serving_engine("builtin", "ghcr.io/gptq-operator/worker:0.1.0"),
}


@pytest.mark.parametrize(
    ("backend", "sms", "kernel"),
    [
        ("auto", CLUSTER, "vllm/machete"),  # an H100 is there: fastest first
        ("auto", [(8, 0), (8, 9)], "vllm/marlin"),
        ("auto", [(7, 5)], "vllm/marlin"),  # Marlin's floor is SM 7.5 in vLLM 0.32
        ("auto", [(7, 0)], "lmdeploy/turbomind"),
        ("lmdeploy", CLUSTER, "lmdeploy/turbomind"),
        ("builtin", [], "builtin/torch"),
    ],
)
def test_kernel_choice_follows_the_cluster(backend, sms, kernel):
    choice = choose(backend, W4G128, DEFAULT_ENGINES, sms, tp=1)
    assert choice.kernel == kernel
    assert choice.engine in ("vLLM 0.32.0", "LMDeploy 0.18.0", "built-in runtime 0.1.0")


def test_choice_respects_what_the_checkpoint_allows():
    asym_3bit = CheckpointSummary(
        bits=3, group_size=128, desc_act=True, sym=False, checkpoint_format="gptq"
    )
    assert choose("auto", asym_3bit, DEFAULT_ENGINES, CLUSTER, tp=1).kernel == "builtin/torch"
    with pytest.raises(Incompatible) as err:
        choose("lmdeploy", asym_3bit, DEFAULT_ENGINES, CLUSTER, tp=1)
    message = str(err.value)
    assert "3-bit (needs 4)" in message and "asymmetric (sym false)" in message
    assert "LMDeploy 0.18.0 rule" in message and "turbomind/converter.py" in message
    with pytest.raises(Incompatible, match=r"no node has a GPU with SM >= 7\.0"):
        choose("lmdeploy", W4G128, DEFAULT_ENGINES, [(6, 1)], tp=1)


def test_asymmetric_checkpoint_on_vllm_names_the_engine_version_and_rule():
    asym = CheckpointSummary(
        bits=4, group_size=128, desc_act=False, sym=False, checkpoint_format="gptq"
    )
    with pytest.raises(Incompatible) as err:
        choose("vllm", asym, DEFAULT_ENGINES, CLUSTER, tp=1)
    message = str(err.value)
    assert "asymmetric (sym false)" in message
    assert "vLLM 0.32.0 rule sym-4-or-8-bit" in message and "auto_gptq.py:98-102" in message


def test_vllm_needs_marlin_on_every_gpu():
    """vLLM 0.32 checks Marlin's types for every GPTQ layer, so a V100 (SM 7.0) is out."""
    with pytest.raises(Incompatible, match=r"vllm/marlin: no node has a GPU with SM >= 7\.5"):
        choose("vllm", W4G128, DEFAULT_ENGINES, [(7, 0)], tp=1)


def test_shapes_are_checked_per_tensor_parallel_shard():
    """Llama-2-7B's down_proj (in 11008) splits into whole groups of 128 at TP 2 but not at
    TP 8: Marlin refuses a group that straddles shards, exllama (fp16) checks only the
    whole matrix, and TurboMind is not asked."""
    fmt = CheckpointSummary.model_validate(
        {
            **W4G128.model_dump(),
            "shapes": [
                {"name": "q_proj", "inFeatures": 4096, "outFeatures": 4096},
                {"name": "down_proj", "inFeatures": 11008, "outFeatures": 4096},
            ],
        }
    )
    assert choose("vllm", fmt, DEFAULT_ENGINES, [(8, 0)], tp=2).kernel == "vllm/marlin"
    assert choose("vllm", fmt, DEFAULT_ENGINES, [(8, 0)], tp=8).kernel == "vllm/exllama"
    from gptq_compat.config import CheckpointFormat
    from gptq_compat.rules import judge
    from gptq_operator.serving import checkpoint_modules

    marlin = next(
        v
        for v in judge(DEFAULT_ENGINES["vllm"], checkpoint_modules(fmt), CheckpointFormat.GPTQ, 8)
        if v.kernel.name == "vllm/marlin"
    )
    assert "in_features 1376 per shard at tensor parallel 8" in marlin.reasons[0]


def test_an_image_of_an_unknown_engine_version_is_refused_by_name():
    assert image_version("vllm/vllm-openai:v0.32.0") == "0.32.0"
    assert image_version("registry:5000/lmdeploy:0.18.0-cu12") == "0.18.0"
    assert image_version("vllm/vllm-openai:latest") is None
    with pytest.raises(
        UnknownEngineVersion, match=r"no serving rules for vllm 0\.11\.0; it knows 0\.32\.0"
    ):
        serving_engine("vllm", "vllm/vllm-openai:v0.11.0")
    old = {**DEFAULT_ENGINES}
    try:
        serving_engine("vllm", "vllm/vllm-openai:latest")
    except UnknownEngineVersion as err:
        old["vllm"] = err
    with pytest.raises(Incompatible, match="cannot tell which vllm version image"):
        choose("vllm", W4G128, old, CLUSTER, tp=1)


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
    from gptq_operator.serving import Choice
    from gptq_operator.settings import OperatorSettings
    from gptq_operator.workload import deployment
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


def test_every_rule_names_its_engine_version_and_source():
    """A rule about another project says which version it describes and where that
    project's source states it."""
    from gptq_compat.engines import ENGINES

    for engine_rules in ENGINES:
        assert re.fullmatch(r"\d+\.\d+\.\d+", engine_rules.version), engine_rules
        assert engine_rules.version in engine_rules.label and engine_rules.how_checked
        rules = [*engine_rules.rules, *(r for k in engine_rules.kernels for r in k.rules)]
        for rule in rules:
            assert re.search(r"\.py:\d+", rule.source), (engine_rules.label, rule.id)
