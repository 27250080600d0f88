"""Tier 4 harness: the real control plane behaves like a cluster with GPU nodes."""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.controlplane

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def api(control_plane):
    return config.new_client_from_config(config_file=str(control_plane.kubeconfig_path()))


@pytest.fixture
def namespace(api):
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the ServiceAccount controller adds "default"
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException:
            time.sleep(0.2)
    yield name
    core.delete_namespace(name)


def wait_for(predicate, timeout: float = 60, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def gpu_job(name: str, affinity_terms: list[dict], gpus: int = 1) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [GPU_TOLERATION],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": affinity_terms
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "worker",
                            "image": "example.invalid/worker:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                }
            },
        },
    }


def job_pods(api, namespace: str, job: str) -> list:
    return (
        client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    )


def test_scheduler_binds_by_compute_capability(api, namespace):
    """SM > 7 ("compute.major Gt 7") and one GPU: only the A100, L40S and H100 qualify."""
    batch = client.BatchV1Api(api)
    term = [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["7"]}
            ]
        }
    ]
    names = [f"sm8-{i}" for i in range(9)]
    for name in names:
        batch.create_namespaced_job(namespace, gpu_job(name, term))

    def all_bound():
        pods = [p for n in names for p in job_pods(api, namespace, n)]
        return pods if len(pods) == len(names) and all(p.spec.node_name for p in pods) else None

    pods = wait_for(all_bound, what="9 pods bound to nodes")
    nodes = {p.spec.node_name for p in pods}
    assert nodes <= {"gpu-a100", "gpu-l40s", "gpu-h100"}, nodes
    assert len(nodes) >= 2  # spread across the eligible nodes, not one by accident
    wait_for(
        lambda: all(
            p.status.phase == "Running" for n in names for p in job_pods(api, namespace, n)
        ),
        what="pods Running",
    )


def test_sm_89_and_above_is_two_ored_terms(api, namespace):
    """SM >= 8.9 as docs/operations.md writes it: major > 8, or major 8 and minor > 8."""
    batch = client.BatchV1Api(api)
    terms = [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["8"]}
            ]
        },
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["8"]},
                {"key": "nvidia.com/gpu.compute.minor", "operator": "Gt", "values": ["8"]},
            ]
        },
    ]
    names = [f"sm89-{i}" for i in range(6)]
    for name in names:
        batch.create_namespaced_job(namespace, gpu_job(name, terms))
    pods = wait_for(
        lambda: (lambda ps: ps if len(ps) == 6 and all(p.spec.node_name for p in ps) else None)(
            [p for n in names for p in job_pods(api, namespace, n)]
        ),
        what="pods bound",
    )
    # only SM >= 8.9 qualifies; which of the two gets the pods depends on free GPUs (pods of
    # earlier tests may still hold some while their namespace is being deleted)
    assert {p.spec.node_name for p in pods} <= {"gpu-l40s", "gpu-h100"}


def test_impossible_requirement_stays_pending_with_reason(api, namespace):
    batch = client.BatchV1Api(api)
    term = [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["9"]}
            ]
        }
    ]
    batch.create_namespaced_job(namespace, gpu_job("sm10", term))

    def unschedulable():
        for pod in job_pods(api, namespace, "sm10"):
            for c in pod.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                    return pod, c
        return None

    pod, condition = wait_for(unschedulable, what="PodScheduled=False")
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    assert "0/6 nodes are available" in condition.message
    assert "didn't match Pod's node affinity/selector" in condition.message
    events = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod.metadata.name}")
        .items
    )
    assert any(e.reason == "FailedScheduling" for e in events)


def test_too_many_gpus_is_unschedulable(api, namespace):
    term = [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}
            ]
        }
    ]
    client.BatchV1Api(api).create_namespaced_job(namespace, gpu_job("greedy", term, gpus=16))
    message = wait_for(
        lambda: next(
            (
                c.message
                for p in job_pods(api, namespace, "greedy")
                for c in p.status.conditions or []
                if c.reason == "Unschedulable"
            ),
            None,
        ),
        what="Unschedulable",
    )
    assert "Insufficient nvidia.com/gpu" in message


@pytest.mark.parametrize(("exit_code", "condition"), [("0", "Complete"), ("3", "Failed")])
def test_kwok_ends_job_pods_and_job_controller_concludes(api, namespace, exit_code, condition):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    term = [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["7"]}
            ]
        }
    ]
    batch.create_namespaced_job(namespace, gpu_job("run", term))
    pod = wait_for(
        lambda: next(
            (p for p in job_pods(api, namespace, "run") if p.status.phase == "Running"), None
        ),
        what="pod Running",
    )
    core.patch_namespaced_pod(
        pod.metadata.name,
        namespace,
        {
            "metadata": {
                "annotations": {
                    "kwok.gptq.dev/exit-code": exit_code,
                    "kwok.gptq.dev/termination-message": '{"layer": 32, "layers": 32}',
                }
            }
        },
    )

    def concluded():
        job = batch.read_namespaced_job_status("run", namespace)
        return next(
            (c for c in job.status.conditions or [] if c.type == condition and c.status == "True"),
            None,
        )

    wait_for(concluded, what=f"Job condition {condition}")
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == int(exit_code)
    assert terminated.message == '{"layer": 32, "layers": 32}'


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.gptq.dev"},
    "spec": {
        "group": "test.gptq.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "bits": {"type": "integer"},
                                    "groupSize": {"type": "integer"},
                                    "descAct": {"type": "boolean"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "!(self.descAct && self.groupSize == -1)",
                                        "message": "descAct needs a group size; set groupSize",
                                    }
                                ],
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_cel_rule_status_subresource_and_generation(api, namespace):
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(CRD)

    def established():
        crd = ext.read_custom_resource_definition(CRD["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(established, what="CRD Established")
    objs = client.CustomObjectsApi(api)
    args = ("test.gptq.dev", "v1", namespace, "widgets")
    try:
        with pytest.raises(ApiException) as rejected:
            objs.create_namespaced_custom_object(
                *args,
                {
                    "apiVersion": "test.gptq.dev/v1",
                    "kind": "Widget",
                    "metadata": {"name": "bad"},
                    "spec": {"bits": 4, "groupSize": -1, "descAct": True},
                },
            )
        assert rejected.value.status == 422
        assert "descAct needs a group size" in rejected.value.body

        w = objs.create_namespaced_custom_object(
            *args,
            {
                "apiVersion": "test.gptq.dev/v1",
                "kind": "Widget",
                "metadata": {"name": "good"},
                "spec": {"bits": 4, "groupSize": 128, "descAct": True},
            },
        )
        assert w["metadata"]["generation"] == 1
        objs.patch_namespaced_custom_object_status(*args, "good", {"status": {"phase": "Ready"}})
        w = objs.get_namespaced_custom_object(*args, "good")
        assert w["status"]["phase"] == "Ready" and w["metadata"]["generation"] == 1
        # status is ignored on the main resource; spec changes bump generation
        objs.patch_namespaced_custom_object(
            *args, "good", {"spec": {"bits": 3}, "status": {"phase": "Hacked"}}
        )
        w = objs.get_namespaced_custom_object(*args, "good")
        assert w["metadata"]["generation"] == 2 and w["status"]["phase"] == "Ready"
    finally:
        ext.delete_custom_resource_definition(CRD["metadata"]["name"])


def test_restricted_user_has_only_what_rbac_grants(control_plane, api, namespace):
    restricted = config.new_client_from_config(
        config_file=str(control_plane.kubeconfig_path("restricted"))
    )
    core = client.CoreV1Api(restricted)
    with pytest.raises(ApiException) as denied:
        core.list_namespaced_pod(namespace)
    assert denied.value.status == 403
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [
                {"kind": "User", "name": "restricted-user", "apiGroup": "rbac.authorization.k8s.io"}
            ],
        },
    )
    wait_for(lambda: _can_list(core, namespace), what="RBAC grant to take effect")
    with pytest.raises(ApiException) as still_denied:
        core.list_namespaced_secret(namespace)
    assert still_denied.value.status == 403


def _can_list(core, namespace) -> bool:
    try:
        core.list_namespaced_pod(namespace)
        return True
    except ApiException:
        return False


def test_nodes_carry_gpu_feature_discovery_labels(api):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(api).list_node().items}
    assert set(nodes) == {"gpu-v100", "gpu-t4", "gpu-a100", "gpu-l40s", "gpu-h100", "cpu-only"}
    h100 = nodes["gpu-h100"].metadata.labels
    assert (h100["nvidia.com/gpu.compute.major"], h100["nvidia.com/gpu.compute.minor"]) == (
        "9",
        "0",
    )
    assert h100["nvidia.com/gpu.family"] == "hopper"
    assert nodes["gpu-t4"].status.allocatable["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu.present" not in nodes["cpu-only"].metadata.labels
