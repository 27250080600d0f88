"""The serving workload of a chosen kernel: Deployment, Service, ServiceMonitor.

Pure functions; ``models.py`` applies them server-side. Engine command lines and the facts
they rely on (flags, environment variables, health endpoints) name the engine version and
the source file they come from.
"""

from __future__ import annotations

import hashlib
import json

from gptq_operator.api import CheckpointSummary, QuantizedModelSpec
from gptq_operator.manifests import PVC_ROOT, SCRATCH, Owner
from gptq_operator.scheduling import sm_node_selector_terms
from gptq_operator.serving import Choice
from gptq_operator.settings import OperatorSettings

PORTS = {"vllm": 8000, "lmdeploy": 23333, "builtin": 8080}


def _model_path(uri: str) -> str:
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return f"{PVC_ROOT}/{claim}/{path}".rstrip("/")


def engine_command(
    choice: Choice,
    name: str,
    model_path: str,
    fmt: CheckpointSummary | None,
    tp: int,
    extra: list[str],
) -> tuple[list[str], list[str]]:
    """(command, args) for the backend's server."""
    if choice.backend == "vllm":
        # vLLM 0.32 maps gptq, gptq_marlin and auto_gptq to one config that picks the
        # kernel per GPU (model_executor/layers/quantization/auto_gptq.py)
        quantization = "gptq"
        return [], [
            "--model",
            model_path,
            "--served-model-name",
            name,
            "--quantization",
            quantization,
            "--tensor-parallel-size",
            str(tp),
            "--port",
            str(PORTS["vllm"]),
            *extra,
        ]
    if choice.backend == "lmdeploy":
        return (
            ["lmdeploy", "serve", "api_server"],
            [
                model_path,
                "--backend",
                "turbomind",
                "--model-format",
                "gptq",
                "--model-name",
                name,
                "--tp",
                str(tp),
                "--server-port",
                str(PORTS["lmdeploy"]),
                *extra,
            ],
        )
    return [], [
        "serve",
        model_path,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORTS["builtin"]),
        "--served-model-name",
        name,
        *extra,
    ]


TEMPLATE_HASH = "gptq.dev/template-hash"


API_KEY_ENV = "GPTQ_API_KEY"


def _api_key_env(spec: QuantizedModelSpec, backend: str) -> list[dict]:
    """The API key from its Secret, as each engine reads it: vLLM 0.32 from VLLM_API_KEY
    (vllm/entrypoints/serve/middleware/register.py:33), the built-in runtime from
    GPTQ_SERVE_API_KEY, LMDeploy 0.18 from ``--api-keys`` (lmdeploy/cli/utils.py:373),
    given as ``$(GPTQ_API_KEY)`` so the key never appears in the pod's spec."""
    ref = spec.api_key_secret_ref
    if ref is None:
        return []
    source = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
    names = {"vllm": ["VLLM_API_KEY"], "builtin": ["GPTQ_SERVE_API_KEY"]}.get(backend, [])
    return [{"name": n, "valueFrom": source} for n in (API_KEY_ENV, *names)]


def serving_labels(owner: Owner) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "gptq-serving",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": "gptq-operator",
        "gptq.dev/quantized-model": owner.name,
    }


def deployment(
    owner: Owner,
    spec: QuantizedModelSpec,
    choice: Choice,
    checkpoint_uri: str,
    fmt: CheckpointSummary | None,
    tp: int,
    settings: OperatorSettings,
) -> dict:
    port = PORTS[choice.backend]
    model_path = _model_path(checkpoint_uri)
    command, args = engine_command(choice, owner.name, model_path, fmt, tp, spec.engine_args or [])
    if spec.api_key_secret_ref is not None and choice.backend == "lmdeploy":
        args = [*args, "--api-keys", f"$({API_KEY_ENV})"]
    images = spec.image.model_dump() if spec.image else {}
    image = images.get(choice.backend) or settings.serving_image(choice.backend)
    # what the pods serve: a new checkpoint changes this hash and so rolls the Deployment
    served = hashlib.sha256(
        json.dumps(
            {
                "uri": checkpoint_uri,
                "format": fmt.model_dump() if fmt else None,
                "kernel": choice.kernel,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    gpus = max(spec.resources.gpus, tp) if choice.backend != "builtin" else spec.resources.gpus
    resources: dict = {"limits": {}, "requests": {}}
    if gpus:
        resources["limits"][settings.gpu_resource] = str(gpus)
    if spec.resources.memory:
        resources["requests"]["memory"] = spec.resources.memory
        resources["limits"]["memory"] = spec.resources.memory
    if spec.resources.cpu:
        resources["requests"]["cpu"] = spec.resources.cpu
    # readiness: the model is loaded; liveness: the process answers (builtin tells them apart).
    # vLLM 0.32 and LMDeploy 0.18 serve /health outside their API-key check
    # (vllm/entrypoints/serve/middleware/authenticate.py:11 guards /v1, /v2, /inference and
    # /cohere; lmdeploy/serve/utils/server_utils.py:104 exempts /health), and both start
    # listening only once the engine is built.
    health = "/health"
    alive = "/healthz" if choice.backend == "builtin" else health
    if choice.backend == "builtin":
        health = "/readyz"
    claim = checkpoint_uri.removeprefix("pvc://").split("/", 1)[0]
    container = {
        "name": "server",
        "image": image,
        "args": args,
        "ports": [{"name": "http", "containerPort": port}],
        "env": [
            {"name": "HOME", "value": SCRATCH},
            {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
            *_api_key_env(spec, choice.backend),
        ],
        "resources": resources,
        "readinessProbe": {"httpGet": {"path": health, "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": alive, "port": "http"},
            "initialDelaySeconds": 30,
            "periodSeconds": 15,
            "failureThreshold": 8,
        },
        "startupProbe": {
            "httpGet": {"path": health, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 90,
        },  # large models take minutes to load
        "volumeMounts": [
            {"name": "checkpoint", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
            # a writable /tmp whatever the image's root filesystem allows
            {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if command:
        container["command"] = command
    pod_spec: dict = {
        "containers": [container],
        "volumes": [
            {"name": "checkpoint", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        ],
        # Pod Security "restricted": non-root (the engines' images run as any UID with HOME
        # on the scratch volume), no privilege escalation, no capabilities, RuntimeDefault
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": list(settings.gpu_tolerations) if gpus else [],
    }
    terms = sm_node_selector_terms(choice.min_sm, choice.max_sm, settings.labels)
    if terms:
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
            }
        }
    if spec.scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(spec.scheduling.node_selector)
    pod_spec["tolerations"] += [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.scheduling.tolerations or []
    ]
    labels = serving_labels(owner)
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            # one Deployment per model, whatever the backend: a backend switch is a rollout
            # of the same Deployment (no second one selecting the same pods)
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"gptq.dev/quantized-model": owner.name}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "gptq.dev/served": served,
                        "gptq.dev/kernel": choice.kernel,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    # the whole pod template's digest, copied by the Deployment to its ReplicaSets: the
    # status finds the ReplicaSet that runs this template without trusting timing
    template = manifest["spec"]["template"]
    template["metadata"]["annotations"][TEMPLATE_HASH] = hashlib.sha256(
        json.dumps(template, sort_keys=True).encode()
    ).hexdigest()[:16]
    return manifest


def service(owner: Owner, choice: Choice) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": serving_labels(owner),
            "ownerReferences": [owner.reference()],
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(PORTS[choice.backend]),
            },
        },
        "spec": {
            "selector": {"gptq.dev/quantized-model": owner.name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def service_monitor(owner: Owner) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": serving_labels(owner),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "selector": {"matchLabels": {"gptq.dev/quantized-model": owner.name}},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }


def endpoint(owner: Owner) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc/v1"
