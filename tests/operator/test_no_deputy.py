"""Least privilege on the real control plane: pods pass Pod Security "restricted"
admission, specs cannot borrow images or Secrets the operator's settings do not allow, and
credentials in a worker's error never reach status or events."""

from __future__ import annotations

import pytest

from tests.controlplane.test_control_plane import wait_for
from tests.operator.test_quantization_job_e2e import (
    GROUP,
    PLURAL,
    RESULT,
    VERSION,
    condition,
    finish,
    get,
    phase,
    qjob,
    running_pod,
)
from tests.operator.test_quantized_model_e2e import (
    create_qmodel,
    model_phase,
    play_worker,
    qmodel,
)

pytestmark = pytest.mark.controlplane
from kubernetes import client  # noqa: E402


def test_worker_and_serving_pods_are_admitted_under_pod_security_restricted(
    operator, api, namespace, volumes
):
    """The API server's own PodSecurity admission, enforcing "restricted" on the namespace,
    admits the worker pod and the serving pods of every backend."""
    client.CoreV1Api(api).patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("psa"))
    play_worker(api, namespace, "psa", RESULT)  # its pod was admitted and ran
    for backend in ("vllm", "lmdeploy", "builtin"):
        create_qmodel(
            api, namespace, f"psa-{backend}", "psa", backend,
            apiKeySecretRef={"name": "gptq-psa-key"},
        )  # fmt: skip
    for backend in ("vllm", "lmdeploy", "builtin"):
        wait_for(
            lambda b=backend: model_phase(api, namespace, f"psa-{b}") == "Ready",
            what=f"{backend} Ready under restricted",
            timeout=90,
        )
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert not [e for e in events if e.reason == "FailedCreate"], [
        e.message for e in events if e.reason == "FailedCreate"
    ]


def test_an_image_the_settings_do_not_allow_is_refused_by_name(operator, api, namespace, volumes):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("img"))
    play_worker(api, namespace, "img", RESULT)
    create_qmodel(
        api, namespace, "img", "img", "vllm",
        image={"vllm": "attacker.example/vllm/vllm-openai:v0.32.0"},
    )  # fmt: skip
    wait_for(lambda: model_phase(api, namespace, "img") == "Failed", what="refused")
    stalled = condition(qmodel(api, namespace, "img"), "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ImageNotAllowed"
    assert stalled["message"].startswith(
        "spec.image.vllm attacker.example/vllm/vllm-openai:v0.32.0: the operator's settings"
    )
    assert client.AppsV1Api(api).list_namespaced_deployment(namespace).items == []


def test_a_secret_the_settings_do_not_allow_is_never_mounted(operator, api, namespace, volumes):
    body = qjob("sec")
    body["spec"]["model"] = {"uri": "hf://org/model", "secretRef": {"name": "db-password"}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    wait_for(lambda: phase(api, namespace, "sec") == "Failed", what="refused")
    job = get(api, namespace, "sec")
    stalled = condition(job, "Stalled")
    assert stalled["reason"] == "SecretNotAllowed"
    assert stalled["message"].startswith("spec.model.secretRef db-password: the operator's")
    assert client.BatchV1Api(api).list_namespaced_job(namespace).items == []


def test_credentials_in_a_workers_error_stay_out_of_status_and_events(
    operator, api, namespace, volumes
):
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, qjob("leak")
    )
    pod = wait_for(lambda: running_pod(api, namespace, "leak-worker-1"), what="worker pod")
    token = "hf_" + "x1y2z3" * 6
    finish(
        api,
        namespace,
        pod,
        2,
        {"error": f"401 from https://bot:{token}@huggingface.co/api/models/org/m (token {token})"},
    )
    wait_for(lambda: phase(api, namespace, "leak") == "Failed", what="Failed")
    job = get(api, namespace, "leak")
    assert token not in str(job["status"])
    assert "[redacted]" in condition(job, "Ready")["message"]
    events = wait_for(
        lambda: (
            client.CoreV1Api(api)
            .list_namespaced_event(namespace, field_selector="involvedObject.name=leak")
            .items
        ),
        what="the job's events",
    )
    assert not [e for e in events if token in (e.message or "")]


POLICY = "templates/worker-status-policy.yaml"


def test_the_worker_policy_guards_every_status_field_but_progress():
    """The admission policy lists the status fields a worker may not touch; a field added
    to the status model and not to the policy would be writable by workers."""
    import re
    from pathlib import Path

    from gptq_operator.api import QuantizationJobStatus

    text = (Path(__file__).resolve().parents[2] / "charts/gptq-operator" / POLICY).read_text()
    guarded = set(re.findall(r"object\.\?status\.\?(\w+) == oldObject\.\?status\.\?\1\b", text))
    fields = {f.alias or n for n, f in QuantizationJobStatus.model_fields.items()}
    assert guarded == fields - {"progress"}


def apply_worker_policy(control_plane, api, namespace, tmp_path, probe_job):
    """Applies the chart's worker policy and returns once the API server enforces it,
    probing with ``probe_job``'s status as the ServiceAccount ``<probe_job>-worker``."""
    import subprocess

    from tests.controlplane.cluster import ensure_binaries
    from tests.deploy.conftest import CHART
    from tests.operator.test_quantization_job_e2e import worker_client

    helm = str(ensure_binaries(build=True) / "helm")
    rendered = subprocess.run(
        [helm, "template", "policy", str(CHART), "--show-only", POLICY],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (tmp_path / "policy.yaml").write_text(rendered)
    control_plane.kubectl("apply", "-f", str(tmp_path / "policy.yaml"))
    worker = client.CustomObjectsApi(
        worker_client(control_plane, api, namespace, f"{probe_job}-worker")
    )
    # the policy takes effect within seconds of being created: probe with a change that
    # differs every time (a change that slipped through before would make an identical one
    # a no-op)
    probes = iter(range(1000, 100000))

    def refused():
        try:
            worker.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, probe_job,
                {"status": {"observedGeneration": next(probes)}},
            )  # fmt: skip
        except client.rest.ApiException as err:
            return err if err.status in (403, 422) else None
        return None

    wait_for(refused, what="the policy in effect", timeout=60)


def worker_account(api, namespace, job):
    """What the operator grants a job's worker, made by hand for tests run without it."""
    rbac = client.RbacAuthorizationV1Api(api)
    name = f"{job}-worker"
    client.CoreV1Api(api).create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": [job],
                    "verbs": ["get", "patch"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )


def test_a_workers_first_report_may_come_before_the_operators_status(
    control_plane, api, namespace, tmp_path
):
    """No operator runs here, so the job has no status at all when its worker reports the
    model size: the policy compares absent fields as equal and lets progress through, and
    still refuses a phase on a job without status. (A worker can start before the operator
    has written its first status; CI once caught the earlier policy refusing that report.)"""
    from gptq_worker.progress.kube import StatusReporter
    from tests.operator.test_quantization_job_e2e import worker_client

    objects = client.CustomObjectsApi(api)
    for job in ("early", "early-probe"):
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob(job))
        worker_account(api, namespace, job)
    apply_worker_policy(control_plane, api, namespace, tmp_path, "early-probe")
    assert "status" not in get(api, namespace, "early")
    worker_api = worker_client(control_plane, api, namespace, "early-worker")
    with pytest.raises(client.rest.ApiException) as err:
        client.CustomObjectsApi(worker_api).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "early", {"status": {"phase": "Succeeded"}}
        )
    assert err.value.status in (403, 422)
    assert "status" not in get(api, namespace, "early")
    StatusReporter(f"{namespace}/early", worker_api).model_size(16_000_000_000, "25Gi")
    status = get(api, namespace, "early")["status"]
    progress = status["progress"]  # with the schema's defaults (layer 0 of 0)
    assert progress["modelBytes"] == 16_000_000_000 and progress["workerMemory"] == "25Gi"
    assert set(status) == {"progress"}


def test_a_worker_may_report_progress_and_nothing_else(
    operator, control_plane, api, namespace, volumes, tmp_path
):
    """The API server itself (ValidatingAdmissionPolicy from the chart) refuses a worker
    token's attempt to mark its job Succeeded; progress still goes through."""
    from gptq_worker.progress.kube import StatusReporter
    from tests.operator.test_quantization_job_e2e import worker_client

    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, qjob("honest")
    )
    wait_for(lambda: running_pod(api, namespace, "honest-worker-1"), what="worker pod")
    apply_worker_policy(control_plane, api, namespace, tmp_path, "honest")
    worker_api = worker_client(control_plane, api, namespace, "honest-worker")
    worker = client.CustomObjectsApi(worker_api)

    def lie(**status):
        worker.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "honest", {"status": status}
        )

    with pytest.raises(client.rest.ApiException) as err:
        lie(phase="Succeeded", result={"outputUri": "pvc://models/x"})
    assert err.value.status in (403, 422)
    assert "a worker may change only status.progress" in err.value.body
    StatusReporter(f"{namespace}/honest", worker_api).layer(3, 32, 10.0)
    status = get(api, namespace, "honest")["status"]
    assert status["progress"]["layer"] == 3 and status["phase"] != "Succeeded"
