"""Operator fixtures on the real control plane: CRDs installed once, fresh namespaces."""

from __future__ import annotations

import uuid

import pytest
import yaml

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
