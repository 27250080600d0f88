"""QuantizationJob reconciled end to end by the Kopf operator on the real control plane.

The test plays the worker: it posts progress with the worker's own ServiceAccount token
and ends the worker pod through kwok with a termination message, as gptq-worker does.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from gptq_worker.progress.kube import StatusReporter
from tests.controlplane.test_control_plane import wait_for
from tests.operator.conftest import scrape

pytestmark = pytest.mark.controlplane
kopf_testing = pytest.importorskip("kopf.testing")
from kubernetes import client  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

GROUP, VERSION, PLURAL = "gptq.dev", "v1alpha1", "quantizationjobs"


def qjob(name: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "QuantizationJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "pvc://models/llama-3.1-8b"},
            "calibration": {"dataset": "pvc://datasets/c4.jsonl"},
            "output": {"uri": f"pvc://models/{name}-w4g128"},
            "scheduling": {"targetKernel": "vllm/marlin"},
        },
    }
    body["spec"].update(spec)
    return body


def get(api, namespace, name) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )


def phase(api, namespace, name):
    return (get(api, namespace, name).get("status") or {}).get("phase")


def condition(obj: dict, type_: str) -> dict | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None
    )


def running_pod(api, namespace, job_name):
    pods = (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector=f"job-name={job_name}")
        .items
    )
    return next((p for p in pods if p.status.phase == "Running"), None)


def finish(api, namespace, pod, exit_code: int, message: dict) -> None:
    client.CoreV1Api(api).patch_namespaced_pod(
        pod.metadata.name,
        namespace,
        {
            "metadata": {
                "annotations": {
                    "kwok.gptq.dev/exit-code": str(exit_code),
                    "kwok.gptq.dev/termination-message": json.dumps(message),
                }
            }
        },
    )


def worker_client(control_plane, api, namespace, service_account):
    """An API client holding a token of the worker's ServiceAccount."""
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            service_account, namespace, {"spec": {"expirationSeconds": 600}}
        )
        .status.token
    )
    cfg = client.Configuration()
    cfg.host = control_plane.server
    cfg.ssl_ca_cert = str(control_plane.pki / "ca.crt")
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


RESULT = {
    "output": "/mnt/pvc/models/llama-w4g128",
    "format": {
        "bits": 4,
        "groupSize": 128,
        "descAct": False,
        "sym": True,
        "checkpointFormat": "gptq",
    },
    "kernels": ["vllm/marlin", "vllm/gptq", "builtin/torch"],
    "perplexityBefore": 6.12,
    "perplexityAfter": 6.31,
}


def test_job_runs_on_capable_node_reports_progress_and_succeeds(
    operator, control_plane, api, namespace, volumes
):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("llama"))
    batch = client.BatchV1Api(api)
    job = wait_for(lambda: _job(batch, namespace, "llama-worker-1"), what="worker Job")
    assert job.metadata.owner_references[0].kind == "QuantizationJob"
    pod = wait_for(lambda: running_pod(api, namespace, "llama-worker-1"), what="pod Running")
    assert pod.spec.node_name in {"gpu-t4", "gpu-a100", "gpu-l40s", "gpu-h100"}  # Marlin: SM >= 7.5
    wait_for(lambda: phase(api, namespace, "llama") == "Running", what="phase Running")

    # the worker's own reporter, with the worker's token: its Role allows exactly this
    worker_api = worker_client(control_plane, api, namespace, "llama-worker")
    StatusReporter(f"{namespace}/llama", worker_api).layer(12, 32, 40.5)
    worker = client.CustomObjectsApi(worker_api)
    progress = get(api, namespace, "llama")["status"]["progress"]
    assert progress == {"layer": 12, "layers": 32, "etaSeconds": 40.5, "message": "layer 12/32"}
    assert get(api, namespace, "llama")["status"]["progress"]["message"] == "layer 12/32"
    table = control_plane.kubectl("get", "qjob", "llama", "-n", namespace)
    assert "layer 12/32" in table and "Running" in table
    for forbidden in (
        lambda: worker.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "llama", {"spec": {"backoffLimit": 0}}
        ),
        lambda: worker.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL),
        lambda: client.CoreV1Api(worker.api_client).list_namespaced_secret(namespace),
    ):
        with pytest.raises(ApiException) as denied:
            forbidden()
        assert denied.value.status == 403

    finish(api, namespace, pod, 0, RESULT)
    wait_for(lambda: phase(api, namespace, "llama") == "Succeeded", what="phase Succeeded")
    done = get(api, namespace, "llama")
    assert condition(done, "Ready")["status"] == "True"
    result = done["status"]["result"]
    assert result["outputUri"] == "pvc://models/llama-w4g128"
    assert result["perplexityAfter"] == 6.31 and "vllm/marlin" in result["kernels"]
    assert done["status"]["attempts"] == [
        {"attempt": 1, "settings": "initial", "outcome": "Succeeded", "perplexityAfter": 6.31}
    ]
    assert done["status"]["observedGeneration"] == done["metadata"]["generation"]
    samples = wait_for(
        lambda: (
            lambda m: (
                m
                if m.get(("gptq_operator_quantization_jobs", (("phase", "Succeeded"),))) == 1
                else None
            )
        )(scrape(operator.metrics)),
        what="metrics",
    )
    assert (
        samples[("gptq_operator_reconciles_total", (("kind", "QuantizationJob"), ("result", "ok")))]
        >= 1
    )
    assert (
        samples[("gptq_operator_reconcile_duration_seconds_count", (("kind", "QuantizationJob"),))]
        >= 1
    )
    liveness = json.loads(urllib.request.urlopen(operator.liveness, timeout=5).read())
    assert liveness["apiserver"] == "v1.36.3"
    assert "spec" in done and done["spec"]["scheduling"] == {
        "targetKernel": "vllm/marlin"
    }  # never rewritten by the operator


def _job(batch, namespace, name):
    try:
        return batch.read_namespaced_job(name, namespace)
    except ApiException:
        return None


def test_no_capable_node_gives_a_condition_not_a_pending_pod(
    operator, control_plane, api, namespace
):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        qjob("future", scheduling={"minComputeCapability": "10.0"}),
    )
    wait_for(lambda: phase(api, namespace, "future") == "Unschedulable", what="Unschedulable")
    cond = condition(get(api, namespace, "future"), "Schedulable")
    assert cond["status"] == "False" and cond["reason"] == "NoCompatibleNodes"
    assert "needs SM >= 10.0 and 1 nvidia.com/gpu" in cond["message"]
    assert "gpu-h100 (SM 9.0)" in cond["message"] and "cpu-only (no GPU labels" in cond["message"]
    assert client.BatchV1Api(api).list_namespaced_job(namespace).items == []
    events = wait_for(
        lambda: (
            client.CoreV1Api(api)
            .list_namespaced_event(namespace, field_selector="involvedObject.name=future")
            .items
        ),
        what="the NoCompatibleNodes event",
    )
    assert [e.reason for e in events].count("NoCompatibleNodes") == 1  # one, counted
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qjob/future", "--timeout=30s"
    )
    assert condition(get(api, namespace, "future"), "Reconciling")["status"] == "False"


def test_failed_quality_gate_climbs_the_remediation_ladder(
    operator, control_plane, api, namespace, volumes
):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        qjob("gated", qualityGate={"maxPerplexityIncrease": 0.1, "remediation": ["descAct"]}),
    )
    pod = wait_for(lambda: running_pod(api, namespace, "gated-worker-1"), what="attempt 1")
    # no resources.memory: the first worker requests the sizing formula's fixed part, then
    # reports the model's size (a 70B model here) with its own token before the first layer
    assert pod.spec.containers[0].resources.requests["memory"] == "9Gi"
    assert "memory" not in (pod.spec.containers[0].resources.limits or {})
    worker_api = worker_client(control_plane, api, namespace, "gated-worker")
    StatusReporter(f"{namespace}/gated", worker_api).model_size(141_100_000_000, "17Gi")
    progress = get(api, namespace, "gated")["status"]["progress"]
    assert progress["modelBytes"] == 141_100_000_000 and progress["workerMemory"] == "17Gi"
    finish(api, namespace, pod, 0, {**RESULT, "perplexityBefore": 6.0, "perplexityAfter": 6.5})
    pod = wait_for(lambda: running_pod(api, namespace, "gated-worker-2"), what="attempt 2")
    assert pod.spec.containers[0].resources.requests["memory"] == "17Gi"  # the formula's
    config = client.CoreV1Api(api).read_namespaced_config_map("gated-worker-2", namespace)
    assert json.loads(config.data["worker.json"])["quantization"]["desc_act"] is True
    finish(api, namespace, pod, 0, {**RESULT, "perplexityBefore": 6.0, "perplexityAfter": 6.05})
    wait_for(lambda: phase(api, namespace, "gated") == "Succeeded", what="Succeeded")
    attempts = get(api, namespace, "gated")["status"]["attempts"]
    assert [(a["attempt"], a["settings"], a["outcome"]) for a in attempts] == [
        (1, "initial", "QualityGateFailed"),
        (2, "descAct", "Succeeded"),
    ]
    assert "more than maxPerplexityIncrease 0.1" in attempts[0]["message"]


def test_bad_input_fails_at_once_with_the_workers_message(operator, api, namespace, volumes):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("broken"))
    pod = wait_for(lambda: running_pod(api, namespace, "broken-worker-1"), what="pod")
    finish(
        api,
        namespace,
        pod,
        2,
        {"error": "in_features 4100 is not a multiple of group_size 128; use group_size 4 or -1"},
    )
    wait_for(lambda: phase(api, namespace, "broken") == "Failed", what="Failed")
    ready = condition(get(api, namespace, "broken"), "Ready")
    assert ready["reason"] == "WorkerFailed" and "use group_size 4 or -1" in ready["message"]
    pods = (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector="job-name=broken-worker-1")
        .items
    )
    assert len(pods) == 1  # podFailurePolicy: exit code 2 is not retried


def test_operator_restart_creates_no_duplicate_children(
    control_plane, api, namespace, volumes, monkeypatch
):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_path()))
    monkeypatch.setenv("GPTQ_METRICS_PORT", "0")  # three operators in turn, no metrics port
    args = ["run", "--all-namespaces", "--standalone", "-m", "gptq_operator.handlers"]
    objects = client.CustomObjectsApi(api)
    batch = client.BatchV1Api(api)
    for _ in range(3):  # create under one operator, then restart it twice
        with kopf_testing.KopfRunner(args, timeout=60) as runner:
            if not _job(batch, namespace, "again-worker-1"):
                objects.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, qjob("again")
                )
            wait_for(lambda: _job(batch, namespace, "again-worker-1"), what="worker Job")
            wait_for(
                lambda: phase(api, namespace, "again") in ("Pending", "Running"),
                what="status written",
            )
        assert runner.exception is None, runner.output
    jobs = batch.list_namespaced_job(namespace, label_selector="gptq.dev/quantization-job=again")
    assert [j.metadata.name for j in jobs.items] == ["again-worker-1"]
    assert (
        len(
            client.CoreV1Api(api)
            .list_namespaced_config_map(namespace, label_selector="gptq.dev/quantization-job=again")
            .items
        )
        == 1
    )
