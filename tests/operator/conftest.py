"""Operator fixtures on the real control plane: CRDs, namespaces, PVCs, a running operator."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes.client import CoreV1Api

from gptq_operator.crd import KINDS, path_for
from tests.controlplane.test_control_plane import wait_for


@pytest.fixture(scope="session")
def api(control_plane):
    """An admin API client with the gptq.dev CRDs installed and Established."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig_path()))
    ext = client.ApiextensionsV1Api(api)
    for kind in KINDS:
        ext.create_custom_resource_definition(yaml.safe_load(path_for(kind).read_text()))
    for kind in KINDS:
        wait_for(
            lambda k=kind: any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(
                    f"{k.plural}.gptq.dev"
                ).status.conditions
                or []
            ),
            what=f"{kind.kind} CRD established",
        )
    return api


@pytest.fixture
def namespace(api):
    from kubernetes import client

    name = f"op-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: _has_default_sa(core, name), what="default ServiceAccount")
    yield name
    core.delete_namespace(name)


def _has_default_sa(core, namespace) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except ApiException:
        return False


@pytest.fixture
def operator(control_plane, api, monkeypatch):
    """The operator, running in this process against the control plane; yields its
    metrics URL."""
    from tests.controlplane.cluster import _free_port

    port, health = _free_port(), _free_port()
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_path()))
    monkeypatch.setenv("GPTQ_METRICS_PORT", str(port))
    args = [
        "run",
        "--all-namespaces",
        "--standalone",
        "-m",
        "gptq_operator.handlers",
        f"--liveness=http://127.0.0.1:{health}/healthz",
    ]
    with KopfRunner(args, timeout=60) as runner:
        yield OperatorEndpoints(
            f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{health}/healthz"
        )
    assert runner.exception is None, runner.output


@dataclass(frozen=True)
class OperatorEndpoints:
    metrics: str
    liveness: str


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of a Prometheus endpoint, parsed by prometheus-client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def volumes(api, namespace):
    """PVCs "models" and "datasets", pre-bound to hostPath volumes (no provisioner here)."""
    core = CoreV1Api(api)
    for claim in ("models", "datasets"):
        pv = f"{namespace}-{claim}"
        core.create_persistent_volume(
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "100Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "hostPath": {"path": f"/tmp/{pv}"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "100Gi"}},
                },
            },
        )
    wait_for(
        lambda: all(
            c.status.phase == "Bound"
            for c in core.list_namespaced_persistent_volume_claim(namespace).items
        ),
        what="PVCs bound",
    )
    yield
    for claim in ("models", "datasets"):
        core.delete_persistent_volume(f"{namespace}-{claim}")
