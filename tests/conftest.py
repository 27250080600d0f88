"""Fixtures shared by every tier."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest
import yaml


@contextlib.contextmanager
def live_output(config):
    """Let what runs inside reach the terminal while pytest captures output: builds that
    take minutes print a line per step instead of sitting silent."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        yield


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory, pytestconfig):
    """A real kube-apiserver, controller-manager and scheduler with kwok GPU nodes.

    Started once per test session. Without the binaries (and without Go to build them) the
    tests that use it are skipped with instructions, except in CI, where they must run.
    """
    from tests.controlplane.cluster import ControlPlane, ControlPlaneUnavailable, ensure_binaries

    try:
        with live_output(pytestconfig):
            ensure_binaries(build=True)
    except ControlPlaneUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the control-plane tier must run in CI: {err}")
        pytest.skip(str(err))
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    try:
        cp.start()
    except Exception:
        cp.stop()
        raise
    print(f"\ncontrol plane ready in {cp.startup_s:.1f}s at {cp.server}")
    yield cp
    cp.stop()


# -- on the control plane: the gptq.dev CRDs, a namespace, its PVCs (operator and chart tiers)


@pytest.fixture(scope="session")
def api(control_plane):
    """An admin API client with the gptq.dev CRDs installed and Established."""
    from kubernetes import client, config

    from gptq_operator.crd import KINDS, path_for
    from tests.controlplane.test_control_plane import wait_for

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

    from tests.controlplane.test_control_plane import wait_for

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


def bind_claims(api, namespace: str, claims=("models", "datasets"), size: str = "100Gi") -> None:
    """PVCs pre-bound to hostPath volumes named ``<namespace>-<claim>`` (no provisioner here),
    waited for until Bound; the caller deletes the volumes."""
    from kubernetes.client import CoreV1Api

    from tests.controlplane.test_control_plane import wait_for

    core = CoreV1Api(api)
    for claim in claims:
        pv = f"{namespace}-{claim}"
        core.create_persistent_volume(
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": size},
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
                    "resources": {"requests": {"storage": size}},
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


@pytest.fixture
def volumes(api, namespace):
    """PVCs "models" and "datasets", pre-bound to hostPath volumes (no provisioner here)."""
    from kubernetes.client import CoreV1Api

    bind_claims(api, namespace)
    yield
    for claim in ("models", "datasets"):
        CoreV1Api(api).delete_persistent_volume(f"{namespace}-{claim}")
