"""Pure builders: a QuantizationJob in, the Kubernetes objects that run its worker out.

No API calls here; ``handlers.py`` applies what these return. Every child has a
deterministic name and an owner reference to the QuantizationJob, so re-running a
handler finds the existing child instead of making a second one, and deleting the
QuantizationJob garbage-collects everything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gptq_compat.config import EvaluationConfig, WorkerConfig
from gptq_compat.sizing import worker_memory
from gptq_operator.api import GROUP, VERSION, QuantizationJobSpec
from gptq_operator.scheduling import (
    SM,
    backend_sm_range,
    kernel_named,
    parse_sm,
    sm_node_selector_terms,
)
from gptq_operator.settings import OperatorSettings

CONFIG_DIR = "/etc/gptq"
PVC_ROOT = "/mnt/pvc"
SCRATCH = "/scratch"
EXIT_BAD_INPUT = 2  # gptq-worker's exit code for input that no retry can fix


class UnsupportedSource(ValueError):
    """A URI scheme this worker version cannot read or write yet."""


@dataclass(frozen=True)
class Owner:
    """The custom resource whose children these are (controller owner reference)."""

    name: str
    namespace: str
    uid: str
    kind: str = "QuantizationJob"

    def reference(self) -> dict:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(base: str, suffix: str, limit: int = 63) -> str:
    """``base-suffix``, shortened with a hash when longer than a label value allows."""
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{base[: limit - len(suffix) - 10]}-{digest}-{suffix}"


def labels(owner: Owner, attempt: int | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "gptq-worker",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": "gptq-operator",
        "gptq.dev/quantization-job": owner.name,
    }
    if attempt is not None:
        out["gptq.dev/attempt"] = str(attempt)
    return out


def sm_range(spec: QuantizationJobSpec) -> tuple[SM | None, SM | None]:
    """The SM range the worker's node must have: from the serving backend, the target kernel
    or an explicit SM. Raises UnknownKernel for a kernel the serving rules do not know."""
    scheduling = spec.scheduling
    if scheduling.min_compute_capability:
        return parse_sm(scheduling.min_compute_capability), None
    if scheduling.target_kernel:
        kernel = kernel_named(scheduling.target_kernel)
        return kernel.min_sm, kernel.max_sm
    if scheduling.serving_backend:
        return backend_sm_range(scheduling.serving_backend)
    return None, None


@dataclass(frozen=True)
class _Mounts:
    volumes: list[dict]
    mounts: list[dict]


def _pvc_path(uri: str) -> tuple[str, str]:
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, path


def _local(uri: str, role: str) -> str:
    if uri.startswith("pvc://"):
        claim, path = _pvc_path(uri)
        return f"{PVC_ROOT}/{claim}/{path}".rstrip("/")
    if uri.startswith("hf://") and role in ("model", "calibration"):
        return uri.removeprefix("hf://").split("@", 1)[0]
    if role in ("calibration", "evaluation") and "://" not in uri:
        return uri  # a Hugging Face dataset name
    raise UnsupportedSource(
        f"{role} {uri!r}: this worker version reads models from hf:// and pvc:// and writes "
        "checkpoints to pvc://; s3:// and hf:// outputs are not supported yet"
    )


def _volumes(spec: QuantizationJobSpec, settings: OperatorSettings) -> _Mounts:
    claims: dict[str, bool] = {}  # claim -> read-only
    for uri, read_only in (
        (spec.model.uri, True),
        (spec.calibration.dataset or "", True),
        (spec.output.uri, False),
    ):
        if uri.startswith("pvc://"):
            claim, _ = _pvc_path(uri)
            claims[claim] = claims.get(claim, True) and read_only
    volumes = [
        {"name": "config", "configMap": {"name": ""}},  # name filled by worker_job
        {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
        # the root filesystem is read-only: /tmp (Python's tempfile, torch) is scratch too
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
    ]
    for i, (claim, read_only) in enumerate(sorted(claims.items())):
        volumes.append(
            {
                "name": f"pvc-{i}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
            }
        )
        mounts.append(
            {"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only}
        )
    return _Mounts(volumes, mounts)


def worker_config(spec: QuantizationJobSpec, gpu_device: str = "cuda") -> WorkerConfig:
    """What the worker pod runs: the spec's settings with URIs turned into local paths."""
    model = _local(spec.model.uri, "model")
    revision = spec.model.uri.split("@", 1)[1] if "@" in spec.model.uri else None
    calibration = spec.calibration.model_copy(
        update={"dataset": _local(spec.calibration.dataset or "", "calibration")}
    )
    evaluation = None
    if spec.quality_gate is not None:  # the gate needs perplexity before and after
        text = spec.quality_gate.eval_dataset or spec.calibration.dataset or ""
        evaluation = EvaluationConfig(text=_local(text, "evaluation"))
    return WorkerConfig(
        evaluation=evaluation,
        model=model,
        revision=revision,
        output=_local(spec.output.uri, "output"),
        quantization=spec.quantization,
        calibration=calibration,
        # no GPU asked for: the worker runs on the CPU (slow, but it is what was asked); with
        # GPUs, what the operator's settings say (cuda; auto: the CPU where the pod sees none)
        device=gpu_device if spec.resources.gpus else "cpu",
        # a retry resumes from the work directory beside the output, whatever this says; it
        # decides only whether an existing checkpoint at the output may be replaced
        overwrite=spec.output.overwrite,
    )


def config_map(
    owner: Owner, spec: QuantizationJobSpec, attempt: int, gpu_device: str = "cuda"
) -> dict:
    cfg = worker_config(spec, gpu_device)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(owner.name, f"worker-{attempt}"),
            "namespace": owner.namespace,
            "labels": labels(owner, attempt),
            "ownerReferences": [owner.reference()],
        },
        "data": {"worker.json": json.dumps(cfg.model_dump(mode="json"), indent=2)},
    }


def worker_rbac(owner: Owner) -> list[dict]:
    """A ServiceAccount that may patch this one QuantizationJob's status, nothing else."""
    name = child_name(owner.name, "worker")
    meta = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner.reference()],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": ["quantizationjobs/status"],
                    "resourceNames": [owner.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


def _env(spec: QuantizationJobSpec, owner: Owner) -> list[dict]:
    env = [
        {"name": "GPTQ_STATUS_TARGET", "value": f"{owner.namespace}/{owner.name}"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        {"name": "HOME", "value": SCRATCH},
    ]
    if spec.model.secret_ref:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": spec.model.secret_ref.name,
                        "key": "HF_TOKEN",
                        "optional": True,
                    }
                },
            }
        )
    return env


def worker_job(
    owner: Owner,
    spec: QuantizationJobSpec,
    settings: OperatorSettings,
    attempt: int = 1,
    model_bytes: int | None = None,
) -> dict:
    """The batch/v1 Job that runs ``gptq-worker quantize`` for ``attempt``.

    Without ``resources.memory`` a GPU worker requests the memory that the sizing formula
    (``gptq_compat.sizing``) gives for ``model_bytes``, the size an earlier attempt's
    worker reported, or for the formula's fixed part where no size is known yet; it sets
    no limit, so an estimate that is short slows nothing and kills nothing.
    """
    worker_config(spec)  # raises UnsupportedSource for URIs the worker cannot use
    min_sm, max_sm = sm_range(spec)
    mounts = _volumes(spec, settings)
    mounts.volumes[0]["configMap"]["name"] = child_name(owner.name, f"worker-{attempt}")
    affinity_terms = sm_node_selector_terms(min_sm, max_sm, settings.labels)
    resources: dict = {"limits": {}, "requests": {}}
    if spec.resources.gpus:
        resources["limits"][settings.gpu_resource] = str(spec.resources.gpus)
    for key in ("cpu", "memory"):
        value = getattr(spec.resources, key)
        if value:
            resources["requests"][key] = value
            if key == "memory":
                resources["limits"][key] = value
    if not spec.resources.memory and spec.resources.gpus:
        resources["requests"]["memory"] = worker_memory(model_bytes or 0)
    tolerations = list(settings.gpu_tolerations) if spec.resources.gpus else []
    tolerations += [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.scheduling.tolerations or []
    ]
    image = spec.image.worker if spec.image and spec.image.worker else settings.worker_image
    pod_spec: dict = {
        "restartPolicy": "Never",
        "serviceAccountName": child_name(owner.name, "worker"),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "worker",
                "image": image,
                "args": [
                    "quantize",
                    "--config",
                    f"{CONFIG_DIR}/worker.json",
                    "--no-progress-bar",
                    "--termination-message",
                    "/dev/termination-log",
                ],
                "env": _env(spec, owner),
                "resources": resources,
                "volumeMounts": mounts.mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": mounts.volumes,
        "tolerations": tolerations,
    }
    if spec.image and spec.image.pull_policy:
        pod_spec["containers"][0]["imagePullPolicy"] = spec.image.pull_policy
    if affinity_terms:
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": affinity_terms
                }
            }
        }
    if spec.scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(spec.scheduling.node_selector)
    job_spec: dict = {
        "backoffLimit": spec.backoff_limit,
        # bad input (exit code 2) fails the Job at once: a retry cannot fix it
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "worker",
                        "operator": "In",
                        "values": [EXIT_BAD_INPUT],
                    },
                }
            ]
        },
        "template": {"metadata": {"labels": labels(owner, attempt)}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child_name(owner.name, f"worker-{attempt}"),
            "namespace": owner.namespace,
            "labels": labels(owner, attempt),
            "ownerReferences": [owner.reference()],
        },
        "spec": job_spec,
    }
