"""QuantizedModel reconciled end to end on the real control plane (simulated GPU nodes).

The examples in examples/ are applied as they are; the test plays both workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.controlplane.test_control_plane import wait_for
from tests.operator.conftest import scrape
from tests.operator.test_quantization_job_e2e import (
    GROUP,
    RESULT,
    VERSION,
    condition,
    finish,
    qjob,
    running_pod,
)

pytestmark = pytest.mark.controlplane
from kubernetes import client  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def apply_example(control_plane, namespace: str, name: str) -> list[dict]:
    docs = list(yaml.safe_load_all((EXAMPLES / name).read_text()))
    control_plane.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / name))
    return docs


def qmodel(api, namespace, name) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "quantizedmodels", name
    )


def model_phase(api, namespace, name):
    return (qmodel(api, namespace, name).get("status") or {}).get("phase")


def create_qmodel(api, namespace: str, name: str, job: str, backend: str, **spec) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "quantizedmodels",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "QuantizedModel",
            "metadata": {"name": name},
            "spec": {"source": {"job": job}, "backend": backend, **spec},
        },
    )


def serving_pods(api, namespace, name):
    return (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector=f"gptq.dev/quantized-model={name}")
        .items
    )


def play_worker(api, namespace, job, result):
    pod = wait_for(lambda: running_pod(api, namespace, f"{job}-worker-1"), what=f"{job} worker")
    finish(api, namespace, pod, 0, result)
    return pod


def test_examples_reach_ready_on_vllm_a100_and_lmdeploy_t4(
    operator, control_plane, api, namespace, volumes
):
    apply_example(control_plane, namespace, "llama-3.1-8b-vllm-a100.yaml")
    apply_example(control_plane, namespace, "qwen2.5-7b-lmdeploy-t4.yaml")
    # until the checkpoints exist, the models wait with a condition that says why
    wait_for(lambda: model_phase(api, namespace, "llama-3-1-8b") == "Waiting", what="Waiting")
    waiting = condition(qmodel(api, namespace, "llama-3-1-8b"), "Ready")
    assert waiting["reason"] == "WaitingForCheckpoint"
    assert "QuantizationJob llama-3-1-8b-w4g128 is" in waiting["message"]

    llama_worker = play_worker(
        api,
        namespace,
        "llama-3-1-8b-w4g128",
        {
            **RESULT,
            # act-order with static groups, as the worker writes it: desc_act false
            "format": {**RESULT["format"], "descAct": False},
            "perplexityBefore": 7.21,
            "perplexityAfter": 7.38,
            "checkpointBytes": 5_700_000_000,
        },
    )
    qwen_worker = play_worker(
        api,
        namespace,
        "qwen2-5-7b-w4g128",
        {
            **RESULT,
            "kernels": [
                "vllm/marlin",
                "vllm/machete",
                "vllm/exllama",
                "lmdeploy/turbomind",
                "builtin/torch",
            ],
            "perplexityBefore": 8.02,
            "perplexityAfter": 8.19,
            "checkpointBytes": 5_500_000_000,
        },
    )
    # the example targets vllm/marlin: SM >= 7.5 in vLLM 0.32
    assert llama_worker.spec.node_name in {"gpu-t4", "gpu-a100", "gpu-l40s", "gpu-h100"}
    # TurboMind 0.18: SM 7.0 to 12.0, so every GPU node of the test cluster
    assert qwen_worker.spec.node_name in {"gpu-v100", "gpu-t4", "gpu-a100", "gpu-l40s", "gpu-h100"}

    for name in ("llama-3-1-8b", "qwen2-5-7b"):
        wait_for(
            lambda n=name: model_phase(api, namespace, n) == "Ready",
            what=f"{name} Ready",
            timeout=90,
        )
    llama, qwen = qmodel(api, namespace, "llama-3-1-8b"), qmodel(api, namespace, "qwen2-5-7b")
    assert (llama["status"]["backend"], llama["status"]["kernel"]) == ("vllm", "vllm/marlin")
    assert (qwen["status"]["backend"], qwen["status"]["kernel"]) == (
        "lmdeploy",
        "lmdeploy/turbomind",
    )
    assert llama["status"]["endpoint"] == f"http://llama-3-1-8b.{namespace}.svc/v1"
    assert llama["status"]["readyReplicas"] == 1 and llama["status"]["selector"]
    assert serving_pods(api, namespace, "llama-3-1-8b")[0].spec.node_name == "gpu-a100"
    assert serving_pods(api, namespace, "qwen2-5-7b")[0].spec.node_name == "gpu-t4"

    apps = client.AppsV1Api(api)
    vllm = apps.read_namespaced_deployment("llama-3-1-8b", namespace)
    args = vllm.spec.template.spec.containers[0].args
    assert args[args.index("--quantization") + 1] == "gptq"
    assert "--max-model-len" in args and args[args.index("--tensor-parallel-size") + 1] == "1"
    assert vllm.spec.template.metadata.annotations["prometheus.io/scrape"] == "true"
    assert vllm.spec.template.spec.containers[0].readiness_probe.http_get.path == "/health"
    lmdeploy = apps.read_namespaced_deployment("qwen2-5-7b", namespace)
    container = lmdeploy.spec.template.spec.containers[0]
    assert container.command == ["lmdeploy", "serve", "api_server"]
    assert container.args[container.args.index("--model-format") + 1] == "gptq"
    assert (
        client.CoreV1Api(api).read_namespaced_service("qwen2-5-7b", namespace).spec.ports[0].port
        == 80
    )

    samples = scrape(operator.metrics)
    assert samples[("gptq_operator_model_time_to_ready_seconds_count", ())] == 2
    table = control_plane.kubectl("get", "qjob,qmodel", "-n", namespace, "-o", "wide")
    print("\n" + table)
    assert "Succeeded" in table and "vllm/marlin" in table and "lmdeploy/turbomind" in table


def test_incompatible_backend_is_refused_with_the_rule(operator, api, namespace, volumes):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "quantizationjobs",
        qjob("g64", quantization={"bits": 4, "groupSize": 64}),
    )
    play_worker(api, namespace, "g64", {**RESULT, "format": {**RESULT["format"], "groupSize": 64}})
    create_qmodel(api, namespace, "g64", "g64", "lmdeploy")
    wait_for(lambda: model_phase(api, namespace, "g64") == "Failed", what="refused")
    ready = condition(qmodel(api, namespace, "g64"), "Ready")
    assert ready["reason"] == "Incompatible"
    assert "lmdeploy/turbomind: group_size 64 (needs one of [128])" in ready["message"]
    assert "LMDeploy 0.18.0 rule group-128: turbomind/converter.py:100" in ready["message"]
    assert client.AppsV1Api(api).list_namespaced_deployment(namespace).items == []


def test_asymmetric_checkpoint_on_vllm_is_refused_naming_engine_version_and_rule(
    operator, api, namespace, volumes
):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "quantizationjobs", qjob("asym", quantization={"sym": False})
    )
    play_worker(api, namespace, "asym", {**RESULT, "format": {**RESULT["format"], "sym": False}})
    create_qmodel(api, namespace, "asym", "asym", "vllm")
    wait_for(lambda: model_phase(api, namespace, "asym") == "Failed", what="refused")
    model = qmodel(api, namespace, "asym")
    ready, stalled = condition(model, "Ready"), condition(model, "Stalled")
    assert ready["reason"] == stalled["reason"] == "Incompatible" and stalled["status"] == "True"
    assert "asymmetric (sym false)" in ready["message"]
    assert "vLLM 0.32.0 rule sym-4-or-8-bit" in ready["message"]
    assert "auto_gptq.py:98-102" in ready["message"]
    assert client.AppsV1Api(api).list_namespaced_deployment(namespace).items == []


def test_changing_the_checkpoint_rolls_the_deployment(operator, api, namespace, volumes):
    objects = client.CustomObjectsApi(api)
    for name in ("first", "second"):
        objects.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "quantizationjobs", qjob(name)
        )
        play_worker(api, namespace, name, RESULT)
    create_qmodel(api, namespace, "m", "first", "vllm")
    wait_for(lambda: model_phase(api, namespace, "m") == "Ready", what="Ready", timeout=90)
    apps = client.AppsV1Api(api)
    before = apps.read_namespaced_deployment("m", namespace).spec.template.metadata
    objects.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "quantizedmodels", "m", {"spec": {"source": {"job": "second"}}}
    )
    wait_for(
        lambda: (
            apps.read_namespaced_deployment("m", namespace).spec.template.metadata.annotations[
                "gptq.dev/served"
            ]
            != before.annotations["gptq.dev/served"]
        ),
        what="new pod template",
    )
    dep = apps.read_namespaced_deployment("m", namespace)
    assert "/mnt/pvc/models/second-w4g128" in dep.spec.template.spec.containers[0].args
    wait_for(
        lambda: (
            len(
                apps.list_namespaced_replica_set(
                    namespace, label_selector="gptq.dev/quantized-model=m"
                ).items
            )
            == 2
        ),
        what="a second ReplicaSet",
    )


def test_model_of_a_failed_job_is_stalled_with_the_jobs_reason(
    operator, control_plane, api, namespace, volumes
):
    """kstatus: a model whose checkpoint cannot come is Stalled (kubectl wait returns), and
    says why, instead of waiting forever."""
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "quantizationjobs", qjob("doomed")
    )
    create_qmodel(api, namespace, "doomed", "doomed", "builtin")
    wait_for(lambda: model_phase(api, namespace, "doomed") == "Waiting", what="Waiting")
    waiting = qmodel(api, namespace, "doomed")
    assert condition(waiting, "Reconciling")["status"] == "True"
    assert condition(waiting, "Stalled")["status"] == "False"
    pod = wait_for(lambda: running_pod(api, namespace, "doomed-worker-1"), what="worker pod")
    finish(api, namespace, pod, 2, {"error": "model_type 'opt' is not supported"})
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qmodel/doomed", "--timeout=90s"
    )
    model = qmodel(api, namespace, "doomed")
    stalled, ready = condition(model, "Stalled"), condition(model, "Ready")
    assert model["status"]["phase"] == "Failed"
    assert stalled["reason"] == ready["reason"] == "SourceJobFailed"
    assert "QuantizationJob doomed failed" in stalled["message"]
    assert "model_type 'opt' is not supported" in stalled["message"]
    assert condition(model, "Reconciling")["status"] == "False"
    events = wait_for(
        lambda: (
            client.CoreV1Api(api)
            .list_namespaced_event(
                namespace, field_selector="involvedObject.name=doomed,reason=SourceJobFailed"
            )
            .items
        ),
        what="the SourceJobFailed event",
    )
    assert len(events) == 1
