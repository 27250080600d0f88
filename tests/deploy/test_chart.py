"""The Helm chart, rendered and linted with the real helm: defaults, options, RBAC, schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gptq_operator.metrics import Metrics
from gptq_operator.settings import OperatorSettings

from .conftest import CHART, ROOT, by_kind

pytestmark = pytest.mark.controlplane  # helm is built with the control plane's binaries

CUSTOM = [
    "operator.watchNamespaces={team-a,team-b}",
    "crds.install=false",
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.prometheusRule.modelNotReadyFor=45m",
    "serviceAccount.name=gptq-bot",
    "operator.image.tag=0.1.1",
    "worker.image.repository=registry.example.com/gptq/worker",
    "gpu.labels.computeMajor=example.com/gpu.sm.major",
    "serving.images.vllm=vllm/vllm-openai:v0.12.0",
    "operator.verbose=true",
]


def test_helm_lint_passes_with_default_and_custom_values(render, tmp_path):
    values = tmp_path / "custom.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "operator": {"watchNamespaces": ["team-a"], "nodeSelector": {"pool": "system"}},
                "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
            }
        )
    )
    for extra in ([], ["--values", str(values)]):
        done = render.run("lint", "--strict", str(CHART), *extra, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_defaults_render_one_operator_with_least_privilege(render):
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "NetworkPolicy",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == OperatorSettings().run_as_user == 10001
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "--all-namespaces" in container["args"] and "--standalone" in container["args"]
    assert container["image"] == "ghcr.io/gptq-operator/operator:0.1.0"
    for crd in by_kind(objects, "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_rbac_lists_every_verb_and_nothing_broad(render):
    for objects in (render(), render(*CUSTOM)):
        roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
        assert roles
        for role in roles:
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], (role["metadata"]["name"], rule)
                assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(
                    rule["verbs"]
                ), rule
                assert "secrets" not in rule["resources"]
        bindings = by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
        assert all(b["roleRef"]["name"] != "cluster-admin" for b in bindings)
        (cluster,) = [r for r in roles if r["metadata"]["name"].endswith("-cluster")]
        assert cluster["rules"] == [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
            {
                "apiGroups": ["apiextensions.k8s.io"],
                "resources": ["customresourcedefinitions"],
                "verbs": ["list", "watch"],
            },
        ]


def test_watched_namespaces_get_role_bindings_and_flags(render):
    objects = render(*CUSTOM)
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["roleRef"]["kind"] == "ClusterRole" for b in bindings)
    cluster_bindings = by_kind(objects, "ClusterRoleBinding")
    assert [b["roleRef"]["name"] for b in cluster_bindings] == ["gptq-operator-cluster"]
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--all-namespaces" not in container["args"] and "--verbose" in container["args"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "gptq-bot"
    assert container["image"] == "ghcr.io/gptq-operator/operator:0.1.1"
    assert not by_kind(objects, "CustomResourceDefinition")


def test_operator_environment_reads_back_as_its_settings(render):
    (deployment,) = by_kind(render(*CUSTOM), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = OperatorSettings.from_env(env)
    assert settings.worker_image == "registry.example.com/gptq/worker:0.1.0"
    assert settings.labels.compute_major == "example.com/gpu.sm.major"
    assert settings.labels.compute_minor == "nvidia.com/gpu.compute.minor"
    assert settings.serving_image("vllm") == "vllm/vllm-openai:v0.12.0"
    assert settings.serving_image("lmdeploy") == "openmmlab/lmdeploy:v0.18.0"
    assert settings.serving_image("builtin") == settings.worker_image  # builtin: "" = worker
    assert settings.metrics_port == 8080 and settings.gpu_resource == "nvidia.com/gpu"


def test_monitoring_objects_select_the_operator_and_alert_on_real_metrics(render):
    objects = render(*CUSTOM)
    (deployment,) = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (podmonitor,) = by_kind(objects, "PodMonitor")
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = by_kind(objects, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert {"GptqQuantizationJobFailed", "GptqQuantizedModelNotReady"} <= alerts.keys()
    assert alerts["GptqQuantizedModelNotReady"]["for"] == "45m"
    exported = {m.name for m in Metrics(CollectorRegistry()).registry.collect()}
    for alert in alerts.values():
        for name in re.findall(r"gptq_operator_[a-z_]+", alert["expr"]):
            assert name.removesuffix("_total") in exported, (alert["alert"], name)


def test_service_monitor_without_service_is_refused(render):
    done = render.run(
        "template", "x", str(CHART),
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled" in done.stderr


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("metrics.port=0", "at '/metrics/port': minimum: got 0, want 1"),
        ("operator.watchNamespaces={Team_A}", "'Team_A' does not match pattern"),
        ("unknownKey=1", "additional properties 'unknownKey' not allowed"),
        ("operator.image.pullPolicy=Sometimes", "at '/operator/image/pullPolicy'"),
        ("metrics.prometheusRule.modelNotReadyFor=soon", "'soon' does not match pattern"),
    ],
)
def test_values_schema_names_the_bad_value(render, setting, says):
    done = render.run("template", "x", str(CHART), "--set", setting, check=False)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr


def test_every_value_has_a_doc_comment():
    """helm-docs style: every value's comment block starts with `# --`; a documented key
    covers its whole value (e.g. ``resources``), an undocumented one is a section whose
    entries must each be documented."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    covered_below: int | None = None  # indent of a documented key whose value is a mapping
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        if covered_below is not None and indent > covered_below:
            continue
        covered_below = None
        j, block = i - 1, []
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        documented = bool(block) and block[0].startswith("# --")
        section = not line.split(":", 1)[1].strip()
        if documented:
            covered_below = indent
        elif not section:
            undocumented.append(f"{i + 1}: {m.group(2)}")
    assert not undocumented, undocumented


def test_values_schema_is_valid_json_and_covers_every_top_level_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_plain_manifests_and_chart_crds_are_in_sync(helm):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        env={"HELM": helm, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, (
        done.stdout + done.stderr + "\nrun: python scripts/sync_manifests.py"
    )


def test_plain_install_is_the_chart_without_crds(render):
    text = (ROOT / "deploy" / "install.yaml").read_text()
    objects = [d for d in yaml.safe_load_all(text) if d]
    assert objects[0]["kind"] == "Namespace"
    assert objects[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    rendered = render("crds.install=false")
    assert objects[1:] == rendered
