"""Serving a checkpoint: pick backend and kernel (docs/serving-compatibility.md), build Deployment+Service.

Pure functions; ``models.py`` applies them. The kernel choice starts from what the worker's
validator found loadable for the real tensors (``status.result.kernels`` of the
QuantizationJob) and keeps those whose SM range some node in the cluster offers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from gptq_compat.config import CheckpointFormat, ModuleSettings
from gptq_compat.kernels import QuantizedModule, serving_kernels
from gptq_operator.api import CheckpointSummary, QuantizedModelSpec
from gptq_operator.manifests import PVC_ROOT, SCRATCH, Owner, child_name
from gptq_operator.scheduling import SM, kernel_named, sm_in_range, sm_node_selector_terms
from gptq_operator.settings import OperatorSettings

# Preference when the backend is "auto": fastest kernels first.
PREFERENCE = (
    "vllm/machete",
    "vllm/gptq_marlin",
    "lmdeploy/turbomind",
    "vllm/gptq",
    "builtin/torch",
)
BACKEND_OF = {name: name.split("/")[0] for name in PREFERENCE}
PORTS = {"vllm": 8000, "lmdeploy": 23333, "builtin": 8080}


class Incompatible(ValueError):
    """The checkpoint, the requested backend and the cluster's GPUs do not fit together."""


@dataclass(frozen=True)
class Choice:
    backend: str
    kernel: str
    min_sm: SM | None
    max_sm: SM | None


def why_not(kernel: str, fmt: CheckpointSummary) -> list[str]:
    """The serving rules that ``fmt`` breaks for ``kernel`` (shapes aside)."""
    settings = ModuleSettings(
        bits=fmt.bits, group_size=fmt.group_size, sym=fmt.sym, desc_act=fmt.desc_act
    )
    module = QuantizedModule(
        "checkpoint", 4096, 4096, settings
    )  # shapes were checked by the worker
    verdicts = serving_kernels([module], CheckpointFormat(fmt.checkpoint_format))
    return next(v.reasons for v in verdicts if v.kernel.name == kernel)


def choose(backend: str, fmt: CheckpointSummary, loadable: list[str], node_sms: list[SM]) -> Choice:
    """The best kernel of ``backend`` that loads the checkpoint and some node can run."""
    candidates = [k for k in PREFERENCE if backend in ("auto", BACKEND_OF[k])]
    problems = []
    for name in candidates:
        kernel = kernel_named(name)
        if name not in loadable:
            reasons = why_not(name, fmt) or ["the worker's validator rejected its shapes"]
            problems.append(f"{name}: {'; '.join(reasons)}")
            continue
        if kernel.min_sm and not any(
            sm_in_range(sm, kernel.min_sm, kernel.max_sm) for sm in node_sms
        ):
            problems.append(f"{name}: no node has a GPU with the SM it needs")
            continue
        return Choice(BACKEND_OF[name], name, kernel.min_sm, kernel.max_sm)
    raise Incompatible(
        f"backend {backend} cannot serve this checkpoint here: " + " | ".join(problems)
    )


def tensor_parallel(
    requested: int | str,
    checkpoint_bytes: int | None,
    gpu_memory_mib: list[int],
    headroom: float = 0.6,
) -> int:
    """``auto``: the smallest power of two whose shards fit in ``headroom`` of the smallest
    eligible GPU's memory (the rest is for the KV cache and activations)."""
    if requested != "auto":
        return int(requested)
    if not checkpoint_bytes or not gpu_memory_mib:
        return 1
    per_gpu = min(gpu_memory_mib) * 2**20 * headroom
    return 2 ** max(0, math.ceil(math.log2(checkpoint_bytes / per_gpu)))


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
        quantization = "gptq" if choice.kernel == "vllm/gptq" else "gptq_marlin"
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
    # readiness: the model is loaded; liveness: the process answers (builtin tells them apart)
    health = "/v1/models" if choice.backend == "lmdeploy" else "/health"
    alive = "/healthz" if choice.backend == "builtin" else health
    if choice.backend == "builtin":
        health = "/readyz"
    claim = checkpoint_uri.removeprefix("pvc://").split("/", 1)[0]
    container = {
        "name": "server",
        "image": image,
        "args": args,
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": "HOME", "value": SCRATCH}, {"name": "HF_HOME", "value": f"{SCRATCH}/hf"}],
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
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
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
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
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
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(owner.name, choice.backend),
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
