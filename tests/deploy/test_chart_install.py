"""The chart on the test control plane: server-side validation, ``helm install``, and the
operator reconciling as the chart's ServiceAccount, which may do what it needs and no more.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client, config

from tests.controlplane.test_control_plane import wait_for

from .conftest import CHART, ROOT, by_kind
from .test_argocd_health import CUSTOMIZATIONS, health
from .test_chart import CUSTOM

pytestmark = pytest.mark.controlplane
MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # no Prometheus Operator here


@pytest.mark.parametrize("sets", [[], CUSTOM], ids=["defaults", "custom"])
def test_rendered_chart_passes_server_side_validation(control_plane, api, render, sets):
    """Every object is checked by the real API server's schemas (strict fields), not stored."""
    core = client.CoreV1Api(api)
    for ns in ("team-a", "team-b", "gptq-system"):
        if ns not in {n.metadata.name for n in core.list_namespace().items}:
            core.create_namespace({"metadata": {"name": ns}})
    objects = [o for o in render(*sets, "crds.install=false") if o["kind"] not in MONITORING]
    text = yaml.safe_dump_all(objects)
    done = control_plane.run_kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=text
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(objects)


def test_examples_pass_server_side_validation(control_plane, api, namespace):
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        ours = [d for d in docs if d["apiVersion"].startswith("gptq.dev/")]
        if not ours:
            assert {d["kind"] for d in docs} == {"Application"}, path.name  # Argo CD's CRD
            continue
        done = control_plane.run_kubectl(
            "apply", "-n", namespace, "--dry-run=server", "--validate=strict",
            "-f", "-", input=yaml.safe_dump_all(ours),
        )  # fmt: skip
        assert done.returncode == 0, f"{path.name}: {done.stderr}"


@pytest.fixture
def release(control_plane, api, helm):
    """``helm install`` into a fresh namespace (CRDs are already installed by the session)."""
    ns = f"gptq-system-{uuid.uuid4().hex[:6]}"
    kubeconfig = str(control_plane.kubeconfig_path())
    name = "gptq"
    done = subprocess.run(
        [helm, "install", name, str(CHART), "--kubeconfig", kubeconfig, "--namespace", ns,
         "--create-namespace", "--set", "crds.install=false"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"$ helm install {name} charts/gptq-operator --namespace {ns} --create-namespace "
          f"--set crds.install=false\n{done.stdout}")  # fmt: skip
    yield {"namespace": ns, "name": name, "sa": "gptq-gptq-operator", "install": done.stdout}
    subprocess.run(
        [helm, "uninstall", name, "--kubeconfig", kubeconfig, "--namespace", ns],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    client.CoreV1Api(api).delete_namespace(ns)


def service_account_kubeconfig(control_plane, api, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a token of ``sa`` (TokenRequest API)."""
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            sa, namespace, {"spec": {"expirationSeconds": 3600}}
        )
        .status.token
    )
    admin = yaml.safe_load(Path(control_plane.kubeconfig_path()).read_text())
    cluster = admin["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        ca = Path(cluster.pop("certificate-authority")).read_bytes()
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa}}],
                "current-context": "sa",
            }
        )
    )
    return path


def test_helm_install_then_the_operator_works_as_the_charts_service_account(
    control_plane, api, release, namespace, volumes, tmp_path, monkeypatch, caplog
):
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    ns, sa = release["namespace"], release["sa"]
    deployment = apps.read_namespaced_deployment("gptq-gptq-operator", ns)
    assert deployment.spec.template.spec.service_account_name == sa
    assert core.read_namespaced_service_account(sa, ns)

    kubeconfig = service_account_kubeconfig(control_plane, api, ns, sa, tmp_path / "sa.yaml")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("GPTQ_METRICS_PORT", "0")
    example = ROOT / "examples" / "llama-3.1-8b-vllm-a100.yaml"
    qjob = next(
        d for d in yaml.safe_load_all(example.read_text()) if d["kind"] == "QuantizationJob"
    )
    objects = client.CustomObjectsApi(api)
    batch = client.BatchV1Api(api)
    args = ["run", "--all-namespaces", "--standalone", "-m", "gptq_operator.handlers"]
    with KopfRunner(args, timeout=90) as runner:
        objects.create_namespaced_custom_object(
            "gptq.dev", "v1alpha1", namespace, "quantizationjobs", qjob
        )
        name = qjob["metadata"]["name"]
        job = f"{name}-worker-1"
        wait_for(
            lambda: any(j.metadata.name == job for j in batch.list_namespaced_job(namespace).items),
            what="the worker Job",
            timeout=60,
        )
        wait_for(
            lambda: (objects.get_namespaced_custom_object_status(
                "gptq.dev", "v1alpha1", namespace, "quantizationjobs", name
            ).get("status") or {}).get("observedGeneration") == 1,
            what="status written by the operator",
            timeout=30,
        )  # fmt: skip
    assert runner.exception is None, runner.output
    assert "Forbidden" not in runner.output and "403" not in runner.output, runner.output
    assert "forbidden" not in caplog.text.lower(), caplog.text

    created = batch.read_namespaced_job(job, namespace)
    owner = created.metadata.owner_references[0]
    assert (owner.kind, owner.name) == ("QuantizationJob", name)
    worker_sa = created.spec.template.spec.service_account_name
    assert core.read_namespaced_service_account(worker_sa, namespace)
    live = objects.get_namespaced_custom_object(
        "gptq.dev", "v1alpha1", namespace, "quantizationjobs", name
    )
    kind_dir = CUSTOMIZATIONS / "gptq.dev" / "QuantizationJob"
    assert health(kind_dir, json.loads(json.dumps(live)))["status"] in ("Progressing", "Degraded")
    listing = control_plane.run_kubectl("get", "jobs", "-n", namespace, "-o", "wide")
    print(f"$ kubectl get jobs -n {namespace} -o wide\n{listing.stdout}")


ALLOWED = [  # (verb, resource, namespaced): what reconciling needs
    ("patch", "quantizationjobs.gptq.dev/status", True),
    ("create", "jobs.batch", True),
    ("create", "roles.rbac.authorization.k8s.io", True),
    ("patch", "deployments.apps", True),
    ("list", "nodes", False),
    ("create", "events", True),
    ("patch", "events", True),  # aggregated: a cause seen again is counted
    ("watch", "pods", True),  # pod states become status reasons
    ("list", "replicasets.apps", True),  # readiness of the current pod template
]
FORBIDDEN = [  # what it must not be able to do
    ("get", "secrets", True),
    ("list", "secrets", True),
    ("delete", "jobs.batch", True),
    ("create", "pods", True),
    ("delete", "quantizationjobs.gptq.dev", True),
    ("patch", "nodes", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", False),
    ("escalate", "roles.rbac.authorization.k8s.io", True),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", False),
]


def test_charts_service_account_may_do_what_it_needs_and_nothing_more(
    control_plane, api, release, namespace, tmp_path
):
    subject = f"system:serviceaccount:{release['namespace']}:{release['sa']}"

    def can(verb: str, resource: str, namespaced: bool) -> bool:
        where = ["-n", namespace] if namespaced else []
        done = control_plane.run_kubectl("auth", "can-i", verb, resource, "--as", subject, *where)
        return done.stdout.strip() == "yes"

    assert [r for r in ALLOWED if not can(*r)] == []
    assert [r for r in FORBIDDEN if can(*r)] == []
    # and a real request, made with the ServiceAccount's own token, is refused
    path = service_account_kubeconfig(
        control_plane, api, release["namespace"], release["sa"], tmp_path / "sa.yaml"
    )
    own = config.new_client_from_config(config_file=str(path))
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as err:
        client.CoreV1Api(own).list_namespaced_secret(namespace)
    assert err.value.status == 403
    assert client.CoreV1Api(own).list_node().items  # what it needs works with the same token


def test_watched_namespaces_limit_the_operator_to_them(control_plane, api, helm, tmp_path):
    """With watchNamespaces, the ServiceAccount can act in those namespaces only."""
    core = client.CoreV1Api(api)
    suffix = uuid.uuid4().hex[:6]
    watched, other, ns = f"watched-{suffix}", f"other-{suffix}", f"gptq-ns-{suffix}"
    for n in (watched, other):
        core.create_namespace({"metadata": {"name": n}})
    kubeconfig = str(control_plane.kubeconfig_path())
    done = subprocess.run(
        [helm, "install", "scoped", str(CHART), "--kubeconfig", kubeconfig, "--namespace", ns,
         "--create-namespace", "--set", "crds.install=false",
         "--set", f"operator.watchNamespaces={{{watched}}}"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        subject = f"system:serviceaccount:{ns}:scoped-gptq-operator"

        def can(verb, resource, where):
            out = control_plane.run_kubectl(
                "auth", "can-i", verb, resource, "--as", subject, "-n", where
            )
            return out.stdout.strip() == "yes"

        assert can("create", "jobs.batch", watched)
        assert not can("create", "jobs.batch", other)
        assert not can("list", "quantizationjobs.gptq.dev", other)
    finally:
        subprocess.run(
            [helm, "uninstall", "scoped", "--kubeconfig", kubeconfig, "--namespace", ns],
            capture_output=True, timeout=120,
        )  # fmt: skip
        for n in (watched, other, ns):
            core.delete_namespace(n)


def test_default_render_includes_the_crds_with_keep_policy(render):
    crds = by_kind(render(), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "quantizationjobs.gptq.dev",
        "quantizedmodels.gptq.dev",
    ]
