"""Serving a checkpoint: pick backend and kernel, build Deployment and Service.

Pure functions; ``models.py`` applies them. The choice applies the serving rules of the
engine version each backend's image runs (docs/serving-compatibility.md) to the checkpoint's
settings and the distinct module shapes the worker reported, per tensor-parallel shard, and
keeps the kernels whose compute-capability range some node in the cluster offers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from gptq_compat.config import CheckpointFormat, ModuleSettings
from gptq_compat.engines import DEFAULT_IMAGES, UnknownEngineVersion, engine
from gptq_compat.rules import Engine, QuantizedModule, judge, sm_text
from gptq_operator.api import CheckpointSummary, QuantizedModelSpec
from gptq_operator.manifests import PVC_ROOT, SCRATCH, Owner
from gptq_operator.scheduling import SM, sm_in_range, sm_node_selector_terms
from gptq_operator.settings import OperatorSettings

# Preference when the backend is "auto": fastest kernels first. vLLM's CPU kernel is not
# here: the operator deploys vLLM's CUDA image.
PREFERENCE = (
    "vllm/machete",
    "vllm/marlin",
    "lmdeploy/turbomind",
    "vllm/exllama",
    "vllm/triton_w4a16",
    "builtin/torch",
)
PORTS = {"vllm": 8000, "lmdeploy": 23333, "builtin": 8080}


class Incompatible(ValueError):
    """The checkpoint, the requested backend and the cluster's GPUs do not fit together."""


@dataclass(frozen=True)
class Choice:
    backend: str
    kernel: str
    min_sm: SM | None
    max_sm: SM | None
    engine: str = ""  # "vLLM 0.32.0": the rule set the choice was made with


def image_version(image: str) -> str | None:
    """The release an image tag names (``vllm/vllm-openai:v0.32.0`` -> ``0.32.0``)."""
    tag = image.rsplit("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    m = re.match(r"^v?(\d+\.\d+\.\d+)", tag)
    return m.group(1) if m else None


def serving_engine(backend: str, image: str) -> Engine:
    """The rule set for the engine version ``image`` runs; UnknownEngineVersion if none."""
    if backend == "builtin":
        return engine(backend)
    version = image_version(image)
    if version is None:
        raise UnknownEngineVersion(
            f"cannot tell which {backend} version image {image!r} runs: tag it with a "
            f"release (e.g. {DEFAULT_IMAGES[backend]})"
        )
    return engine(backend, version)


def checkpoint_modules(fmt: CheckpointSummary) -> list[QuantizedModule]:
    """The checkpoint's quantized modules as the rules see them: one per distinct shape the
    worker reported, or one that only carries the settings when shapes are unknown."""
    settings = ModuleSettings(
        bits=fmt.bits, group_size=fmt.group_size, sym=fmt.sym, desc_act=fmt.desc_act
    )
    if not fmt.shapes:
        return [QuantizedModule("checkpoint", 4096, 4096, settings)]
    return [QuantizedModule(s.name, s.in_features, s.out_features, settings) for s in fmt.shapes]


def choose(
    backend: str,
    fmt: CheckpointSummary,
    engines: dict[str, Engine | UnknownEngineVersion],
    node_sms: list[SM],
    tp: int,
) -> Choice:
    """The best kernel of ``backend`` that loads the checkpoint at tensor parallel ``tp``
    and that some node can run. ``engines`` holds the rule set of each backend's image."""
    candidates = [k for k in PREFERENCE if backend in ("auto", k.split("/")[0])]
    modules = checkpoint_modules(fmt)
    problems = []
    for name in candidates:
        rules = engines[name.split("/")[0]]
        if isinstance(rules, UnknownEngineVersion):
            problems.append(f"{name}: {rules}")
            continue
        kernel = rules.kernel(name)
        verdict = next(
            v
            for v in judge(rules, modules, CheckpointFormat(fmt.checkpoint_format), tp)
            if v.kernel.name == name
        )
        if not verdict.loads:
            problems.append(f"{name}: {'; '.join(verdict.reasons)}")
            continue
        if kernel.min_sm and not any(
            sm_in_range(sm, kernel.min_sm, kernel.max_sm) for sm in node_sms
        ):
            problems.append(f"{name}: no node has a GPU with {sm_text(kernel)} ({rules.label})")
            continue
        return Choice(rules.backend, name, kernel.min_sm, kernel.max_sm, rules.label)
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
