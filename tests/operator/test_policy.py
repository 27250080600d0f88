"""No deputy: what a spec may name (images, Secrets), what serving pods run as, and that
credentials never reach status or events (tier 1, pure)."""

from __future__ import annotations

import json

import pytest

from gptq_operator.api import CheckpointSummary, QuantizedModelSpec
from gptq_operator.manifests import Owner
from gptq_operator.policy import image_allowed, refuse_images, refuse_secrets, scrub
from gptq_operator.serving import Choice
from gptq_operator.settings import OperatorSettings, repository
from gptq_operator.workload import deployment

W4G128 = CheckpointSummary.model_validate(
    {"bits": 4, "groupSize": 128, "descAct": False, "sym": True, "checkpointFormat": "gptq"}
)
DEFAULTS = OperatorSettings.from_env({})


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("vllm/vllm-openai:v0.32.0", "vllm/vllm-openai"),
        ("localhost:5000/vllm:1", "localhost:5000/vllm"),
        ("ghcr.io/a/b@sha256:0123", "ghcr.io/a/b"),
        ("ghcr.io/a/b:1@sha256:0123", "ghcr.io/a/b"),
        ("busybox", "busybox"),
    ],
)
def test_repository_of_an_image_reference(image, repo):
    assert repository(image) == repo


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("vllm/vllm-openai:v0.31.0", True),  # another tag of a default image's repository
        ("openmmlab/lmdeploy:v0.18.0", True),
        ("ghcr.io/gptq-operator/worker:0.2.0", True),
        ("evil.example/vllm/vllm-openai:v0.32.0", False),
        ("vllm/vllm-openai-fork:v0.32.0", False),  # a prefix of the name is not the name
        ("docker.io/library/busybox", False),
    ],
)
def test_by_default_only_the_default_images_repositories_are_allowed(image, allowed):
    assert image_allowed(image, DEFAULTS) is allowed


def test_allowed_images_from_the_environment_with_paths_and_wildcard():
    settings = OperatorSettings.from_env({"GPTQ_ALLOWED_IMAGES": "registry.corp/ml/, x/y"})
    assert image_allowed("registry.corp/ml/vllm:1", settings)
    assert image_allowed("x/y:2", settings)
    assert not image_allowed("vllm/vllm-openai:v0.32.0", settings)
    assert image_allowed("anything/at:all", OperatorSettings.from_env({"GPTQ_ALLOWED_IMAGES": "*"}))


def test_refusals_name_the_field_the_value_and_the_setting():
    why = refuse_images({"vllm": "evil/vllm:1", "lmdeploy": None}, DEFAULTS)
    assert why.startswith("spec.image.vllm evil/vllm:1: the operator's settings do not allow")
    assert "GPTQ_ALLOWED_IMAGES" in why and "Helm value policy.allowedImages" in why
    why = refuse_secrets({"spec.apiKeySecretRef": "db-password"}, DEFAULTS)
    assert why.startswith("spec.apiKeySecretRef db-password: the operator's settings do not")
    assert "hf-token, gptq-*" in why and "GPTQ_ALLOWED_SECRETS" in why
    assert "Helm value policy.allowedSecrets" in why
    assert refuse_secrets({"a": "hf-token", "b": "gptq-llama-key", "c": None}, DEFAULTS) is None


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("cannot read s3://AKIAEXAMPLE:s3cr3t@bucket/model", "s3cr3t"),
        ("GET https://user:hunter2@huggingface.co/api failed", "hunter2"),
        ("401 for token hf_abcdefghijklmnopqrstuvwxyzABCD", "hf_abcdefghijklmnopqrstuvwxyzABCD"),
        ("key AKIAIOSFODNN7EXAMPLE rejected", "AKIAIOSFODNN7EXAMPLE"),
        ("bearer sk-proj-0123456789abcdefghijkl", "sk-proj-0123456789abcdefghijkl"),
    ],
)
def test_credentials_are_scrubbed_from_text(text, leak):
    out = scrub(text)
    assert leak not in out and "[redacted]" in out


def _serving(backend: str, key: bool = True) -> dict:
    body = {"source": {"uri": "pvc://models/m-w4g128"}, "backend": backend}
    if key:
        body["apiKeySecretRef"] = {"name": "gptq-m-key", "key": "token"}
    spec = QuantizedModelSpec.model_validate(body)
    kernel = {"vllm": "vllm/marlin", "lmdeploy": "lmdeploy/turbomind"}.get(backend, "builtin/torch")
    choice = Choice(backend, kernel, None, None)
    owner = Owner("m", "ml", "uid-1", kind="QuantizedModel")
    return deployment(owner, spec, choice, "pvc://models/m-w4g128", W4G128, 1, DEFAULTS)


@pytest.mark.parametrize("backend", ["vllm", "lmdeploy", "builtin"])
def test_serving_pods_meet_pod_security_restricted(backend):
    pod = _serving(backend)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    allowed_volumes = {"persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected"}
    assert all(set(v) - {"name"} <= allowed_volumes for v in pod["volumes"])


@pytest.mark.parametrize(
    ("backend", "names"),
    [
        ("vllm", {"GPTQ_API_KEY", "VLLM_API_KEY"}),
        ("lmdeploy", {"GPTQ_API_KEY"}),
        ("builtin", {"GPTQ_API_KEY", "GPTQ_SERVE_API_KEY"}),
    ],
)
def test_the_api_key_comes_from_its_secret_and_never_appears_in_the_spec(backend, names):
    manifest = _serving(backend)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    from_secret = {
        e["name"]
        for e in container["env"]
        if e.get("valueFrom") == {"secretKeyRef": {"name": "gptq-m-key", "key": "token"}}
    }
    assert from_secret == names
    if backend == "lmdeploy":  # LMDeploy 0.18 takes keys as arguments only
        i = container["args"].index("--api-keys")
        assert container["args"][i + 1] == "$(GPTQ_API_KEY)"
    assert container["readinessProbe"]["httpGet"]["path"] in ("/health", "/readyz")
    text = json.dumps(manifest)
    assert "valueFrom" in text and 'value": "token' not in text


def test_without_an_api_key_no_secret_is_mounted():
    container = _serving("vllm", key=False)["spec"]["template"]["spec"]["containers"][0]
    assert not [e for e in container["env"] if "valueFrom" in e]
