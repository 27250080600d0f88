"""Reconciling a QuantizedModel: wait for its checkpoint, choose a kernel, roll out serving.

One function, :func:`sync`, does it all and is safe to run at any time, from any trigger
(a spec change, a change of its Deployment or pods, of its source QuantizationJob, or the
periodic re-check of nodes): it applies the children the spec calls for (server-side, field
manager ``gptq-operator``, so re-running changes nothing), removes children of a backend no
longer chosen, then publishes the whole status from what it observes (``status.publish``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from gptq_compat.engines import UnknownEngineVersion
from gptq_operator.api import CheckpointSummary, QuantizedModelSpec, spec_errors
from gptq_operator.manifests import Owner
from gptq_operator.observe import failure as _failure
from gptq_operator.observe import pod_cause
from gptq_operator.policy import refuse_images, refuse_secrets
from gptq_operator.scheduling import kernel_named, list_nodes, node_sm
from gptq_operator.serving import (
    Choice,
    Incompatible,
    choose,
    serving_engine,
    tensor_parallel,
)
from gptq_operator.settings import OperatorSettings
from gptq_operator.status import kstatus, publish, read_live, read_owner
from gptq_operator.workload import (
    TEMPLATE_HASH,
    deployment,
    endpoint,
    service,
    service_monitor,
)

PLURAL, KIND = "quantizedmodels", "QuantizedModel"
DEFAULT_KERNEL = {
    "vllm": "vllm/marlin",
    "lmdeploy": "lmdeploy/turbomind",
    "builtin": "builtin/torch",
}
PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
    "Service": "/api/v1/namespaces/{namespace}/services/{name}",
    "ServiceMonitor": (
        "/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors/{name}"
    ),
}
# ServiceMonitor only where the Prometheus Operator's CRD is installed; a missing CRD is
# remembered for a while instead of being asked about on every reconcile
_absent: dict[str, float] = {}
_absent_lock = threading.Lock()
ABSENT_FOR_S = 300.0


def apply(api: client.ApiClient, obj: dict) -> dict:
    """Server-side apply (field manager gptq-operator); returns the object as stored.

    Made with the typed client's plain ``call_api`` (no discovery, no shared cache), so
    reconciles in parallel threads are safe."""
    path = PATHS[obj["kind"]].format(**obj["metadata"])
    return api.call_api(
        path,
        "PATCH",
        query_params=[("fieldManager", "gptq-operator"), ("force", "true")],
        header_params={
            "Content-Type": "application/apply-patch+yaml",
            "Accept": "application/json",
        },
        body=obj,
        response_type="object",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )


def _apply_optional(api: client.ApiClient, obj: dict) -> None:
    with _absent_lock:
        if time.monotonic() < _absent.get(obj["kind"], 0.0):
            return
    try:
        apply(api, obj)
    except ApiException as err:
        if err.status != 404:
            raise
        with _absent_lock:
            _absent[obj["kind"]] = time.monotonic() + ABSENT_FOR_S


class SourceJobFailed(RuntimeError):
    """The QuantizationJob a model is served from failed: no checkpoint will come."""


@dataclass(frozen=True)
class Plan:
    """What the spec calls for, given the checkpoint and the nodes as they are now."""

    state: str  # "waiting" | "stalled" | "serve"
    reason: str = ""
    message: str = ""
    choice: Choice | None = None
    uri: str | None = None
    fmt: CheckpointSummary | None = None
    tp: int = 1


def _checkpoint(
    api: client.ApiClient, namespace: str, spec: QuantizedModelSpec
) -> tuple[str | None, CheckpointSummary | None, int | None, str]:
    """(uri, format, bytes, waiting message); uri None while waiting."""
    if spec.source.uri:
        return spec.source.uri, None, None, ""
    qjob = read_owner(api, "quantizationjobs", namespace, spec.source.job)
    if qjob is None:
        return None, None, None, f"QuantizationJob {spec.source.job} does not exist"
    status = qjob.get("status") or {}
    if status.get("phase") == "Failed":
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        why = f": {ready['message']}" if ready.get("message") else ""
        raise SourceJobFailed(
            f"QuantizationJob {spec.source.job} failed{why}; delete and re-create it with a "
            f"fix, and this model follows"
        )
    if status.get("phase") != "Succeeded":
        progress = (status.get("progress") or {}).get("message")
        detail = f" ({progress})" if progress else ""
        return (
            None,
            None,
            None,
            f"QuantizationJob {spec.source.job} is {status.get('phase') or 'Pending'}{detail}",
        )
    result = status.get("result") or {}
    fmt = CheckpointSummary.model_validate(result["format"]) if result.get("format") else None
    return result.get("outputUri"), fmt, result.get("checkpointBytes"), ""


def plan(
    api: client.ApiClient,
    body: dict,
    spec: QuantizedModelSpec,
    settings: OperatorSettings,
    nodes: list[dict] | None = None,
) -> Plan:
    """Decide from the spec, the checkpoint and the nodes; touches nothing."""
    images = spec.image.model_dump() if spec.image else {}
    if refused := refuse_images(images, settings):
        return Plan("stalled", "ImageNotAllowed", refused)
    secrets = {
        "spec.source.secretRef": spec.source.secret_ref.name if spec.source.secret_ref else None,
        "spec.apiKeySecretRef": (spec.api_key_secret_ref.name if spec.api_key_secret_ref else None),
    }
    if refused := refuse_secrets(secrets, settings):
        return Plan("stalled", "SecretNotAllowed", refused)
    try:
        uri, fmt, size, waiting = _checkpoint(api, body["metadata"]["namespace"], spec)
    except SourceJobFailed as err:
        return Plan("stalled", "SourceJobFailed", str(err))
    if uri is None:
        return Plan("waiting", "WaitingForCheckpoint", waiting)
    nodes = list_nodes(api) if nodes is None else nodes
    selector = spec.scheduling.node_selector or {}
    nodes = [
        n
        for n in nodes
        if all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
    ]
    sms = [sm for n in nodes if (sm := node_sm(n["metadata"].get("labels") or {}, settings.labels))]
    # tensor parallelism first (from the checkpoint's size and the GPUs' memory): the
    # serving rules check shapes per shard
    memories = [
        int(labels[settings.labels.memory])
        for n in nodes
        if settings.labels.memory in (labels := n["metadata"].get("labels") or {})
    ]
    tp = tensor_parallel(spec.tensor_parallel_size, size, memories)
    engines: dict = {}
    for backend in ("vllm", "lmdeploy", "builtin"):
        try:
            engines[backend] = serving_engine(
                backend, images.get(backend) or settings.serving_image(backend)
            )
        except UnknownEngineVersion as err:
            engines[backend] = err
    try:
        if fmt is None:  # a bare checkpoint URI: its format is unknown until it is read
            if spec.backend == "auto":
                raise Incompatible(
                    "set backend (vllm, lmdeploy or builtin) for a checkpoint "
                    "given by uri, or point source.job at a QuantizationJob"
                )
            if isinstance(engines[spec.backend], UnknownEngineVersion):
                raise Incompatible(str(engines[spec.backend]))
            kernel = kernel_named(DEFAULT_KERNEL[spec.backend])
            choice = Choice(spec.backend, kernel.name, kernel.min_sm, kernel.max_sm)
        else:
            choice = choose(spec.backend, fmt, engines, sms, tp)
    except Incompatible as err:
        return Plan("stalled", "Incompatible", str(err))
    return Plan("serve", choice=choice, uri=uri, fmt=fmt, tp=tp)


def sync(
    api: client.ApiClient,
    namespace: str,
    name: str,
    settings: OperatorSettings,
    nodes: list[dict] | None = None,
) -> dict | None:
    """Bring one QuantizedModel's children and status in line with its spec (module doc)."""
    body = read_live(api, PLURAL, namespace, name)
    if body is None:
        return None
    meta = body["metadata"]
    generation = meta.get("generation")
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], kind=KIND)
    try:
        spec = QuantizedModelSpec.model_validate(body["spec"])
    except ValidationError as err:  # admitted by the schema, refused by the models
        spec, decided = None, Plan("stalled", "InvalidSpec", spec_errors(err))
    else:
        decided = plan(api, body, spec, settings, nodes)
    manifest: dict = {}
    if decided.state == "serve":
        assert decided.choice is not None and decided.uri is not None and spec is not None
        manifest = deployment(
            owner, spec, decided.choice, decided.uri, decided.fmt, decided.tp, settings
        )
        apply(api, manifest)
        apply(api, service(owner, decided.choice))
        _apply_optional(api, service_monitor(owner))

    def compute(latest: dict) -> dict[str, Any] | None:
        if latest["metadata"].get("generation") != generation:
            return None  # a newer spec: its own sync writes its status
        status = latest.get("status") or {}
        out: dict[str, Any] = {"observedGeneration": generation}
        if decided.state != "serve":
            out["phase"] = "Failed" if decided.state == "stalled" else "Waiting"
            state = "stalled" if decided.state == "stalled" else "progressing"
            out["conditions"] = kstatus(
                status.get("conditions"), state, decided.reason, decided.message, generation
            )
            if decided.state == "stalled":
                out["lastFailure"] = _failure(status, decided.reason, decided.message)
            return out
        assert decided.choice is not None and spec is not None
        out.update(_observe(api, namespace, name, manifest, spec.replicas, decided, status))
        out["conditions"] = kstatus(
            status.get("conditions"), out.pop("_state"), out.pop("_reason"),
            out.pop("_message"), generation,
        )  # fmt: skip
        out.update(
            backend=decided.choice.backend,
            kernel=decided.choice.kernel,
            endpoint=endpoint(owner),
            selector=f"gptq.dev/quantized-model={name}",
        )
        return out

    return publish(api, PLURAL, KIND, namespace, name, compute)


def _observe(
    api: client.ApiClient,
    namespace: str,
    name: str,
    manifest: dict,
    replicas: int,
    decided: Plan,
    status: dict,
) -> dict[str, Any]:
    """Phase and readiness from the ReplicaSet that runs the wanted pod template (found by
    its template digest, so a Deployment whose generation moved for metadata alone does not
    read as a rollout) and from the pods, as they are now."""
    assert decided.choice is not None
    wanted = manifest["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH]
    selector = f"gptq.dev/quantized-model={name}"
    sets = client.AppsV1Api(api).list_namespaced_replica_set(namespace, label_selector=selector)
    ready = updated = 0
    for rs in sets.items:
        annotations = (rs.spec.template.metadata.annotations or {}) if rs.spec.template else {}
        owners = [r.name for r in rs.metadata.owner_references or []]
        if annotations.get(TEMPLATE_HASH) == wanted and manifest["metadata"]["name"] in owners:
            ready += (rs.status.ready_replicas or 0) if rs.status else 0
            updated += (rs.status.replicas or 0) if rs.status else 0
    out: dict[str, Any] = {"replicas": replicas, "readyReplicas": ready}
    kernel = decided.choice.kernel
    if ready >= replicas:
        what = f"{ready}/{replicas} replicas ready on {kernel} (tensor parallel {decided.tp})"
        out.update(phase="Ready", _state="ready", _reason="Ready", _message=what)
        return out
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    cause = pod_cause(pods)
    if cause is not None:
        out.update(phase="Failed" if ready == 0 else "Degraded")
        out.update(_state="stalled", _reason=cause.reason, _message=cause.message)
        out["lastFailure"] = _failure(status, cause.reason, cause.message, cause.exit_code)
        return out
    what = f"{ready}/{replicas} replicas ready, {updated} updated, on {kernel} from {decided.uri}"
    out.update(phase="Deploying", _state="progressing", _reason="Deploying", _message=what)
    return out


def sync_dependents(
    api: client.ApiClient,
    namespace: str,
    job: str,
    settings: OperatorSettings,
    nodes: list[dict] | None = None,
) -> None:
    """A QuantizationJob changed: sync the models that serve its output."""
    items = client.CustomObjectsApi(api).list_namespaced_custom_object(
        "gptq.dev", "v1alpha1", namespace, PLURAL
    )["items"]
    for model in items:
        if ((model.get("spec") or {}).get("source") or {}).get("job") == job:
            sync(api, namespace, model["metadata"]["name"], settings, nodes)
