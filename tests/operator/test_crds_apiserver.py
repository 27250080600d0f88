"""The generated CRDs in a real API server: defaults, CEL rules, columns, scale (tier 4)."""

from __future__ import annotations

import copy
import json

import pytest

from gptq_operator.api import QuantizationJobSpec, QuantizedModelSpec

pytestmark = pytest.mark.controlplane
kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

GROUP, VERSION = "gptq.dev", "v1alpha1"

QJOB = {
    "apiVersion": "gptq.dev/v1alpha1",
    "kind": "QuantizationJob",
    "metadata": {"name": "llama"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct@main"},
        "calibration": {"dataset": "allenai/c4"},
        "output": {"uri": "pvc://models/llama-3.1-8b-w4g128"},
    },
}
QMODEL = {
    "apiVersion": "gptq.dev/v1alpha1",
    "kind": "QuantizedModel",
    "metadata": {"name": "llama"},
    "spec": {"source": {"job": "llama"}},
}


def create(api, namespace, body, plural):
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body, field_validation="Strict"
    )


def with_changes(base: dict, **spec_paths) -> dict:
    """``with_changes(QJOB, quantization__bits=5)`` sets spec.quantization.bits = 5;
    a value of ``...`` deletes the key."""
    body = copy.deepcopy(base)
    for dotted, value in spec_paths.items():
        node = body["spec"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body


MODEL_URI = "model.uri must be hf://org/name[@revision], s3://bucket/prefix or pvc://claim/path"
GROUP_SIZE = (
    "groupSize must be -1 (one group per output channel) or a positive number of columns, e.g. 128"
)
DYNAMIC_KEY = (
    "a dynamic key is a module regex, '+:regex' (override) or '-:regex' (leave "
    "unquantized); the regex cannot be empty"
)

INVALID_JOBS = [
    ("no model", {"model": ...}, "spec.model: Required value"),
    ("ftp model", {"model__uri": "ftp://host/model"}, MODEL_URI),
    ("hf without org", {"model__uri": "hf://llama"}, MODEL_URI),
    (
        "credentials in model uri",
        {"model__uri": "s3://key:secret@models/llama"},
        "model.uri must not hold credentials (user:password@); put them in a Secret and "
        "name it in model.secretRef",
    ),
    (
        "credentials in output uri",
        {"output__uri": "hf://user:token@acme/llama-w4", "output__secretRef": {"name": "hf"}},
        "output.uri must not hold credentials (user:password@); put them in a Secret and "
        "name it in output.secretRef",
    ),
    (
        "ftp output",
        {"output__uri": "ftp://host/out"},
        "output.uri must be s3://bucket/prefix, pvc://claim/path or hf://org/name",
    ),
    ("bits 5", {"quantization__bits": 5}, "Unsupported value: 5"),
    ("group size as text", {"quantization__groupSize": "128"}, "must be of type integer"),
    ("group size 0", {"quantization__groupSize": 0}, GROUP_SIZE),
    ("group size -2", {"quantization__groupSize": -2}, GROUP_SIZE),
    ("empty dynamic key", {"quantization__dynamic": {"": {"bits": 8}}}, DYNAMIC_KEY),
    ("bare skip key", {"quantization__dynamic": {"-:": {}}}, DYNAMIC_KEY),
    ("GPTAQ weight over 1", {"quantization__gptaqAlpha": 2}, "spec.quantization.gptaqAlpha"),
    ("zero damping", {"quantization__dampPercent": 0}, "dampPercent"),
    ("damping over 1", {"quantization__dampPercent": 1.5}, "dampPercent"),
    ("awq format", {"quantization__checkpointFormat": "awq"}, 'Unsupported value: "awq"'),
    (
        "unknown quantization field",
        {"quantization__bitz": 4},
        'unknown field "spec.quantization.bitz"',
    ),
    (
        "no calibration dataset",
        {"calibration": {"nsamples": 128}},
        "calibration.dataset is required",
    ),
    ("zero samples", {"calibration__nsamples": 0}, "spec.calibration.nsamples"),
    ("unknown profile", {"calibration__profile": "huge"}, 'Unsupported value: "huge"'),
    (
        "hf output without token",
        {"output__uri": "hf://acme/llama-w4"},
        "publishing to hf:// needs secretRef",
    ),
    (
        "output equals model",
        {"model__uri": "pvc://models/llama", "output__uri": "pvc://models/llama"},
        "output.uri must differ from model.uri",
    ),
    ("negative gpus", {"resources__gpus": -1}, "spec.resources.gpus"),
    (
        "memory not a quantity",
        {"resources__memory": "lots"},
        "memory must be a quantity of bytes such as 64Gi, 512Mi or 1.5G",
    ),
    (
        "cpu not a quantity",
        {"resources__cpu": "eight"},
        "cpu must be a quantity of CPUs such as 8, 0.5 or 500m",
    ),
    (
        "kernel and SM both",
        {"scheduling": {"targetKernel": "vllm/machete", "minComputeCapability": "9.0"}},
        "set at most one of servingBackend, targetKernel and minComputeCapability",
    ),
    (
        "backend and SM both",
        {"scheduling": {"servingBackend": "vllm", "minComputeCapability": "9.0"}},
        "set at most one of servingBackend, targetKernel and minComputeCapability",
    ),
    (
        "SM in words",
        {"scheduling__minComputeCapability": "eight"},
        "minComputeCapability must be a GPU compute capability major.minor, e.g. '8.0' or '9.0'",
    ),
    (
        "kernel without backend",
        {"scheduling__targetKernel": "tensorrt"},
        "targetKernel must be 'backend/kernel' in lower case, e.g. 'vllm/marlin'",
    ),
    (
        "unknown backend",
        {"scheduling__servingBackend": "tensorrt"},
        'Unsupported value: "tensorrt"',
    ),
    (
        "gate without threshold",
        {"qualityGate": {"remediation": ["descAct"]}},
        "set maxPerplexityIncrease",
    ),
    (
        "unknown remediation",
        {"qualityGate": {"maxPerplexityIncrease": 0.5, "remediation": ["quantumLeap"]}},
        'Unsupported value: "quantumLeap"',
    ),
    ("backoff over 10", {"backoffLimit": 11}, "spec.backoffLimit"),
    ("deadline under a minute", {"activeDeadlineSeconds": 5}, "spec.activeDeadlineSeconds"),
    ("secretRef without name", {"model__secretRef": {}}, "spec.model.secretRef.name"),
]

INVALID_MODELS = [
    (
        "job and uri",
        {"source": {"job": "llama", "uri": "pvc://models/x"}},
        "source needs exactly one of job",
    ),
    ("empty source", {"source": {}}, "source needs exactly one of job"),
    (
        "source uri in words",
        {"source": {"uri": "models/llama"}},
        "source.uri must be hf://org/name[@revision], s3://bucket/prefix or pvc://claim/path",
    ),
    (
        "credentials in source uri",
        {"source": {"uri": "hf://user:token@acme/llama-w4"}},
        "source.uri must not hold credentials (user:password@); put them in a Secret and "
        "name it in source.secretRef",
    ),
    (
        "hf source (served from PVCs only)",
        {"source": {"uri": "hf://acme/llama-w4"}},
        "source.uri: this version serves checkpoints from pvc://claim/path only",
    ),
    (
        "s3 source (served from PVCs only)",
        {"source": {"uri": "s3://bucket/llama-w4"}},
        "copy an hf:// or s3:// checkpoint to a PersistentVolumeClaim first",
    ),
    ("unknown backend", {"backend": "tgi"}, 'Unsupported value: "tgi"'),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("tp in words", {"tensorParallelSize": "many"}, "tensorParallelSize is 'auto'"),
    ("tp zero", {"tensorParallelSize": 0}, "tensorParallelSize is 'auto'"),
]


@pytest.mark.parametrize(
    ("case", "changes", "message"), INVALID_JOBS, ids=[c[0] for c in INVALID_JOBS]
)
def test_invalid_quantization_jobs_are_rejected(api, namespace, case, changes, message):
    with pytest.raises(ApiException) as rejected:
        create(api, namespace, with_changes(QJOB, **changes), "quantizationjobs")
    assert rejected.value.status in (400, 422), rejected.value.body  # 400: strict decoding
    said = json.loads(rejected.value.body)["message"]
    assert message in said and "should match" not in said  # words, not a raw regex


@pytest.mark.parametrize(
    ("case", "changes", "message"), INVALID_MODELS, ids=[c[0] for c in INVALID_MODELS]
)
def test_invalid_quantized_models_are_rejected(api, namespace, case, changes, message):
    with pytest.raises(ApiException) as rejected:
        create(api, namespace, with_changes(QMODEL, **changes), "quantizedmodels")
    assert rejected.value.status in (400, 422), rejected.value.body  # 400: strict decoding
    said = json.loads(rejected.value.body)["message"]
    assert message in said and "should match" not in said  # words, not a raw regex


@pytest.mark.parametrize(
    ("base", "plural", "message"),
    [
        (
            QJOB,
            "quantizationjobs",
            "metadata.name must be at most 63 characters: the worker's objects carry it as a "
            "label value",
        ),
        (
            QMODEL,
            "quantizedmodels",
            "metadata.name must be at most 63 characters: it names the model's Service and "
            "is a label value of its pods",
        ),
    ],
    ids=["QuantizationJob", "QuantizedModel"],
)
def test_names_over_63_characters_are_rejected(api, namespace, base, plural, message):
    body = copy.deepcopy(base)
    body["metadata"]["name"] = "q" * 64
    with pytest.raises(ApiException) as rejected:
        create(api, namespace, body, plural)
    assert rejected.value.status == 422, rejected.value.body
    assert message in json.loads(rejected.value.body)["message"]
    body["metadata"]["name"] = "q" * 63
    assert create(api, namespace, body, plural)["metadata"]["name"] == "q" * 63


def test_server_fills_defaults_that_parse_back_into_the_models(api, namespace):
    job = create(api, namespace, QJOB, "quantizationjobs")
    spec = job["spec"]
    assert spec["quantization"]["bits"] == 4 and spec["quantization"]["groupSize"] == 128
    assert spec["quantization"]["checkpointFormat"] == "gptq"
    assert spec["calibration"]["profile"] == "general"
    assert spec["resources"] == {"gpus": 1} and spec["backoffLimit"] == 2
    parsed = QuantizationJobSpec.model_validate(spec)
    assert parsed.quantization.group_size == 128 and parsed.output.uri.startswith("pvc://")

    model = create(api, namespace, QMODEL, "quantizedmodels")
    assert model["spec"]["backend"] == "auto" and model["spec"]["tensorParallelSize"] == "auto"
    assert QuantizedModelSpec.model_validate(model["spec"]).replicas == 1


def test_scale_subresource_and_printer_columns(control_plane, api, namespace):
    create(api, namespace, QMODEL, "quantizedmodels")
    objs = client.CustomObjectsApi(api)
    objs.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "quantizedmodels", "llama", {"spec": {"replicas": 3}}
    )
    assert (
        objs.get_namespaced_custom_object(GROUP, VERSION, namespace, "quantizedmodels", "llama")[
            "spec"
        ]["replicas"]
        == 3
    )
    create(api, namespace, QJOB, "quantizationjobs")
    table = control_plane.kubectl("get", "qjob,qmodel", "-n", namespace, "-o", "wide")
    for header in (
        "PHASE",
        "PROGRESS",
        "MODEL",
        "BITS",
        "GROUP",
        "PPL-AFTER",
        "ETA-SECONDS",
        "REASON",
        "READY",
        "DESIRED",
        "READY-REPLICAS",
        "BACKEND",
        "ENDPOINT",
    ):
        assert header in table
    assert "hf://meta-llama/Llama-3.1-8B-Instruct@main" in table
    assert "gptq" in control_plane.kubectl("api-resources", "--categories=gptq")
