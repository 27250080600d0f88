"""Pure builders (tier 1): affinity encoding, worker Job, RBAC, quality gate, conditions."""

from __future__ import annotations

import json

import pytest

from gptq_compat.config import WorkerConfig
from gptq_operator.api import QualityGate, QuantizationJobSpec
from gptq_operator.crd import NAME_LIMIT
from gptq_operator.manifests import (
    Owner,
    UnsupportedSource,
    child_name,
    config_map,
    worker_job,
    worker_rbac,
)
from gptq_operator.quality_gate import gate_verdict, spec_for_attempt
from gptq_operator.scheduling import judge_nodes, sm_node_selector_terms
from gptq_operator.settings import LabelKeys, OperatorSettings
from gptq_operator.status import set_condition

KEYS = LabelKeys()
ALL_SM = [
    (6, 0),
    (6, 1),
    (7, 0),
    (7, 2),
    (7, 5),
    (8, 0),
    (8, 6),
    (8, 7),
    (8, 9),
    (9, 0),
    (10, 0),
    (10, 3),
    (12, 0),
]


def _matches(terms: list[dict], sm: tuple[int, int]) -> bool:
    """Node-affinity semantics, written out: terms are ORed, expressions ANDed; Gt/Lt
    compare integers; In compares strings."""
    labels = {KEYS.compute_major: str(sm[0]), KEYS.compute_minor: str(sm[1])}

    def expression(e):
        value = labels.get(e["key"])
        if value is None:
            return False
        if e["operator"] == "In":
            return value in e["values"]
        if e["operator"] == "Gt":
            return int(value) > int(e["values"][0])
        if e["operator"] == "Lt":
            return int(value) < int(e["values"][0])
        raise AssertionError(e["operator"])

    return any(all(expression(e) for e in t["matchExpressions"]) for t in terms)


@pytest.mark.parametrize("minimum", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)])
def test_min_sm_affinity_admits_exactly_the_capable_gpus(minimum):
    terms = sm_node_selector_terms(minimum, None, KEYS)
    for sm in ALL_SM:
        assert _matches(terms, sm) == (sm >= minimum), (minimum, sm)
    assert len(terms) == (1 if minimum[1] == 0 else 2)  # SM >= 8.9 needs two ORed terms


def test_sm_range_affinity_for_turbomind_and_machete():
    turbomind = sm_node_selector_terms((7, 0), (8, 9), KEYS)
    machete = sm_node_selector_terms((9, 0), (9, 0), KEYS)
    for sm in ALL_SM:
        assert _matches(turbomind, sm) == ((7, 0) <= sm <= (8, 9)), sm
        assert _matches(machete, sm) == (sm == (9, 0)), sm
    assert sm_node_selector_terms(None, None, KEYS) == []


SPEC = {
    "model": {"uri": "pvc://models/llama-3.1-8b", "secretRef": {"name": "hf"}},
    "calibration": {"dataset": "pvc://datasets/c4.jsonl", "nsamples": 64},
    "output": {"uri": "pvc://models/llama-3.1-8b-w4g128"},
    "scheduling": {
        "targetKernel": "vllm/marlin",
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
        ],
    },
    "resources": {"gpus": 2, "memory": "64Gi"},
    "backoffLimit": 1,
}
OWNER = Owner("llama", "ml", "0000-1111")


def test_worker_job_is_pinned_secured_and_owned():
    job = worker_job(OWNER, QuantizationJobSpec.model_validate(SPEC), OperatorSettings())
    assert job["metadata"]["name"] == "llama-worker-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "0000-1111"
    assert job["spec"]["backoffLimit"] == 1
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    pod = job["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert _matches(terms, (7, 5)) and not _matches(terms, (7, 0))  # vLLM 0.32 Marlin: SM >= 7.5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] is False  # model and output share a claim
    assert mounts["/mnt/pvc/datasets"]["readOnly"] is True
    assert "/scratch" in mounts  # writable scratch beside the read-only root
    assert {t.get("key") for t in pod["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN", "optional": True}},
    } in container["env"]
    assert pod["serviceAccountName"] == "llama-worker"
    # building twice gives the same object: the name is the idempotency key
    assert job == worker_job(OWNER, QuantizationJobSpec.model_validate(SPEC), OperatorSettings())


def test_worker_config_uses_local_paths():
    cm = config_map(OWNER, QuantizationJobSpec.model_validate(SPEC), attempt=1)
    cfg = WorkerConfig.model_validate(json.loads(cm["data"]["worker.json"]))
    assert cfg.model == "/mnt/pvc/models/llama-3.1-8b"
    assert cfg.output == "/mnt/pvc/models/llama-3.1-8b-w4g128"
    assert cfg.calibration.dataset == "/mnt/pvc/datasets/c4.jsonl"
    hf = {
        **SPEC,
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B@v1"},
        "calibration": {"dataset": "allenai/c4"},
    }
    cfg = WorkerConfig.model_validate(
        json.loads(
            config_map(OWNER, QuantizationJobSpec.model_validate(hf), 1)["data"]["worker.json"]
        )
    )
    assert (cfg.model, cfg.revision, cfg.calibration.dataset) == (
        "meta-llama/Llama-3.1-8B",
        "v1",
        "allenai/c4",
    )


def test_quality_gate_asks_the_worker_to_measure_perplexity():
    gated = {
        **SPEC,
        "qualityGate": {
            "maxPerplexityIncrease": 0.5,
            "evalDataset": "pvc://datasets/wiki.test.txt",
        },
    }
    cm = config_map(OWNER, QuantizationJobSpec.model_validate(gated), attempt=1)
    cfg = WorkerConfig.model_validate(json.loads(cm["data"]["worker.json"]))
    assert cfg.evaluation.text == "/mnt/pvc/datasets/wiki.test.txt"
    ungated = config_map(OWNER, QuantizationJobSpec.model_validate(SPEC), attempt=1)
    assert json.loads(ungated["data"]["worker.json"])["evaluation"] is None


def test_unsupported_sources_are_named():
    s3 = {**SPEC, "model": {"uri": "s3://bucket/llama"}}
    with pytest.raises(UnsupportedSource, match="model 's3://bucket/llama'"):
        worker_job(OWNER, QuantizationJobSpec.model_validate(s3), OperatorSettings())


def test_worker_role_allows_only_its_own_status():
    sa, role, binding = worker_rbac(OWNER)
    assert role["rules"] == [
        {
            "apiGroups": ["gptq.dev"],
            "resources": ["quantizationjobs/status"],
            "resourceNames": ["llama"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"] == "llama-worker"


def test_child_names_fit_label_values():
    long = "q" * 70
    name = child_name(long, "worker-12")
    assert len(name) <= 63 and name.endswith("-worker-12")
    assert name == child_name(long, "worker-12")


def test_the_longest_name_admission_allows_fits_every_child_object():
    owner = Owner("q" * NAME_LIMIT, "ml", "0000-1111")
    spec = QuantizationJobSpec.model_validate(SPEC)
    objects = [
        worker_job(owner, spec, OperatorSettings(), attempt=4),
        config_map(owner, spec, 4),
        *worker_rbac(owner),
    ]
    for obj in objects:
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        assert all(len(v) <= 63 for v in meta.get("labels", {}).values()), meta["labels"]


def _node(name, sm=None, gpus=0, taint=True):
    labels = {}
    if sm:
        labels = {KEYS.compute_major: str(sm[0]), KEYS.compute_minor: str(sm[1])}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
            if sm and taint
            else []
        },
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def test_judge_nodes_says_why():
    nodes = [
        _node("t4", (7, 5), 4),
        _node("a100", (8, 0), 8),
        _node("cpu"),
        _node("h100-small", (9, 0), 1),
        _node("h100-untolerated", (9, 0), 8),
    ]
    gpu_toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    verdicts = {
        v.name: v
        for v in judge_nodes(nodes, (8, 0), None, 2, {}, gpu_toleration, KEYS, "nvidia.com/gpu")
    }
    assert verdicts["a100"].fits and not verdicts["t4"].fits
    assert verdicts["t4"].why == "SM 7.5"
    assert verdicts["h100-small"].why == "SM 9.0, 1 nvidia.com/gpu allocatable"
    untolerated = judge_nodes(nodes[-1:], (8, 0), None, 2, {}, [], KEYS, "nvidia.com/gpu")
    assert untolerated[0].why == "SM 9.0, untolerated taint"


def test_quality_gate_and_remediation_ladder():
    gate = QualityGate(
        max_perplexity_increase=0.2,
        max_perplexity_increase_percent=1.0,
        remediation=["descAct", "mseScales", "smallerGroup", "eightBit"],
    )
    assert gate_verdict(gate, 10.0, 10.05)[0]
    ok, why = gate_verdict(gate, 10.0, 10.5)
    assert not ok and "maxPerplexityIncrease 0.2" in why
    ok, why = gate_verdict(QualityGate(max_perplexity_increase_percent=1.0), 10.0, 10.15)
    assert not ok and "1.50%" in why
    assert not gate_verdict(gate, None, None)[0]
    plain = {"descAct": False}
    spec = QuantizationJobSpec.model_validate(
        {**SPEC, "quantization": plain, "qualityGate": gate.model_dump()}
    )
    steps = [spec_for_attempt(spec, {}, n).quantization for n in (1, 2, 3, 4, 5)]
    assert [(q.desc_act, q.mse, q.group_size, q.bits) for q in steps] == [
        (False, 0.0, 128, 4),
        (True, 0.0, 128, 4),
        (True, 2.4, 128, 4),
        (True, 2.4, 64, 4),
        (True, 2.4, 64, 8),
    ]


def test_set_condition_keeps_transition_time_when_status_is_unchanged():
    first = set_condition(None, "Ready", "False", "Running", "a", 1)
    again = set_condition(first, "Ready", "False", "Running", "b", 2)
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert again[0]["message"] == "b" and again[0]["observedGeneration"] == 2
    assert len(set_condition(again, "Stalled", "True", "X", "", 2)) == 2


def test_a_job_without_gpus_runs_its_worker_on_the_cpu():
    def device(gpus: int) -> str:
        spec = QuantizationJobSpec.model_validate({**SPEC, "resources": {"gpus": gpus}})
        return json.loads(config_map(OWNER, spec, attempt=1)["data"]["worker.json"])["device"]

    assert (device(0), device(1)) == ("cpu", "cuda")


def test_the_gpu_device_setting_reaches_only_workers_that_asked_for_gpus():
    def device(gpus: int, setting: str) -> str:
        spec = QuantizationJobSpec.model_validate({**SPEC, "resources": {"gpus": gpus}})
        cm = config_map(OWNER, spec, attempt=1, gpu_device=setting)
        return json.loads(cm["data"]["worker.json"])["device"]

    assert (device(1, "auto"), device(0, "auto"), device(2, "cuda")) == ("auto", "cpu", "cuda")
    from gptq_operator.settings import OperatorSettings

    assert OperatorSettings.from_env({"GPTQ_WORKER_GPU_DEVICE": "auto"}).worker_gpu_device == "auto"
    with pytest.raises(ValueError):
        OperatorSettings.from_env({"GPTQ_WORKER_GPU_DEVICE": "tpu"})


def test_an_existing_checkpoint_is_replaced_only_when_the_spec_says_so():
    def overwrite(output: dict) -> bool:
        spec = QuantizationJobSpec.model_validate({**SPEC, "output": output})
        return json.loads(config_map(OWNER, spec, attempt=2)["data"]["worker.json"])["overwrite"]

    uri = SPEC["output"]["uri"]
    assert overwrite({"uri": uri}) is False  # every attempt, the first and the retries
    assert overwrite({"uri": uri, "overwrite": True}) is True


def test_worker_memory_request_follows_the_model_size_when_the_spec_sets_none():
    """Sizing formula (docs/operations.md): a request, never a limit, for a GPU worker."""
    spec = QuantizationJobSpec.model_validate({**SPEC, "resources": {"gpus": 1}})

    def resources(**kw):
        job = worker_job(OWNER, spec, OperatorSettings(), **kw)
        return job["spec"]["template"]["spec"]["containers"][0]["resources"]

    first = resources()  # no size known yet: the formula's fixed part
    assert first["requests"] == {"memory": "9Gi"} and "memory" not in first["limits"]
    later = resources(attempt=2, model_bytes=141_100_000_000)  # a 70B model, as reported
    assert later["requests"] == {"memory": "17Gi"} and "memory" not in later["limits"]
    # what the user sets wins, as request and limit
    pinned = worker_job(
        OWNER,
        QuantizationJobSpec.model_validate({**SPEC, "resources": {"gpus": 1, "memory": "4Gi"}}),
        OperatorSettings(),
        model_bytes=141_100_000_000,
    )["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert pinned["requests"]["memory"] == pinned["limits"]["memory"] == "4Gi"
    # a CPU worker (gpus 0: small models, tests) is not sized by a formula measured on GPUs
    cpu = worker_job(
        OWNER,
        QuantizationJobSpec.model_validate({**SPEC, "resources": {"gpus": 0}}),
        OperatorSettings(),
        model_bytes=16_060_000_000,
    )["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "memory" not in cpu["requests"]
