"""Reconciling a QuantizedModel: wait for its checkpoint, choose a kernel, roll out serving.

Deployment and Service are applied server-side (field manager ``gptq-operator``), so a
new checkpoint or setting rolls the pods and re-running the handler changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from gptq_compat.engines import UnknownEngineVersion
from gptq_operator.api import GROUP, VERSION, CheckpointSummary, QuantizedModelSpec
from gptq_operator.manifests import Owner
from gptq_operator.scheduling import kernel_named, node_sm
from gptq_operator.serving import (
    Choice,
    Incompatible,
    choose,
    deployment,
    endpoint,
    service,
    service_monitor,
    serving_engine,
    tensor_parallel,
)
from gptq_operator.settings import OperatorSettings
from gptq_operator.status import Outcome, read_owner, set_condition, stalled

PLURAL = "quantizedmodels"
DEFAULT_KERNEL = {
    "vllm": "vllm/marlin",
    "lmdeploy": "lmdeploy/turbomind",
    "builtin": "builtin/torch",
}


_dynamic: dict[int, DynamicClient] = {}


def _apply(api: client.ApiClient, obj: dict) -> dict:
    """Server-side apply (field manager gptq-operator); returns the object as stored."""
    if id(api) not in _dynamic:  # discovery is costly: one dynamic client per API client
        _dynamic[id(api)] = DynamicClient(api)
    dyn = _dynamic[id(api)]
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    stored = dyn.server_side_apply(
        resource,
        body=obj,
        name=obj["metadata"]["name"],
        namespace=obj["metadata"]["namespace"],
        field_manager="gptq-operator",
        force_conflicts=True,
    )
    return stored.to_dict()


class SourceJobFailed(RuntimeError):
    """The QuantizationJob a model is served from failed: no checkpoint will come."""


def _checkpoint(
    api: client.ApiClient, namespace: str, spec: QuantizedModelSpec
) -> tuple[str | None, CheckpointSummary | None, list[str] | None, int | None, str]:
    """(uri, format, loadable kernels, bytes, waiting message); uri None while waiting."""
    if spec.source.uri:
        return spec.source.uri, None, None, None, ""
    qjob = read_owner(api, "quantizationjobs", namespace, spec.source.job)
    if qjob is None:
        return None, None, None, None, f"QuantizationJob {spec.source.job} does not exist"
    status = qjob.get("status") or {}
    if status.get("phase") == "Failed":
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        why = f": {ready['message']}" if ready.get("message") else ""
        raise SourceJobFailed(f"QuantizationJob {spec.source.job} failed{why}")
    if status.get("phase") != "Succeeded":
        progress = (status.get("progress") or {}).get("message")
        detail = f" ({progress})" if progress else ""
        return (
            None,
            None,
            None,
            None,
            f"QuantizationJob {spec.source.job} is {status.get('phase') or 'Pending'}{detail}",
        )
    result = status.get("result") or {}
    fmt = CheckpointSummary.model_validate(result["format"]) if result.get("format") else None
    return (result.get("outputUri"), fmt, result.get("kernels"), result.get("checkpointBytes"), "")


def reconcile(api: client.ApiClient, body: dict, settings: OperatorSettings) -> Outcome:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], kind="QuantizedModel")
    spec = QuantizedModelSpec.model_validate(body["spec"])
    conditions = status.get("conditions")

    try:
        uri, fmt, _validated, size, waiting = _checkpoint(api, owner.namespace, spec)
    except SourceJobFailed as err:
        # Stalled until the job succeeds (re-created, it runs again); looked at
        # again each minute, so the model recovers by itself
        conditions = stalled(conditions, "SourceJobFailed", str(err), generation)
        conditions = set_condition(
            conditions, "Reconciling", "False", "SourceJobFailed", str(err), generation
        )
        first = status.get("phase") != "Failed"
        events = [("Warning", "SourceJobFailed", str(err))] if first else []
        return Outcome(
            {"phase": "Failed", "conditions": conditions, "observedGeneration": generation},
            events,
            retry_after=60,
        )
    conditions = _progressing(conditions, generation)
    if uri is None:
        conditions = set_condition(
            conditions, "Ready", "False", "WaitingForCheckpoint", waiting, generation
        )
        conditions = set_condition(
            conditions, "Reconciling", "True", "WaitingForCheckpoint", waiting, generation
        )
        return Outcome(
            {"phase": "Waiting", "conditions": conditions, "observedGeneration": generation},
            [],
            retry_after=10,
        )
    nodes = [n.to_dict() for n in client.CoreV1Api(api).list_node().items]
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
    images = spec.image.model_dump() if spec.image else {}
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
        conditions = stalled(conditions, "Incompatible", str(err), generation)
        return Outcome(
            {"phase": "Failed", "conditions": conditions, "observedGeneration": generation},
            [("Warning", "Incompatible", str(err))],
            retry_after=120,
        )

    dep = _apply(api, deployment(owner, spec, choice, uri, fmt, tp, settings))
    _apply(api, service(owner, choice))
    events: list[tuple[str, str, str]] = []
    # a ServiceMonitor only where the Prometheus Operator's CRD is installed
    with contextlib.suppress(ResourceNotFoundError):
        _apply(api, service_monitor(owner))
    # Readiness from the Deployment and the model's conditions as they are now, not as they
    # were when this handler started: observe_deployment may have written both meanwhile,
    # and this patch would take them back. (This narrows, and does not close, the race of
    # two status writers.)
    now = client.AppsV1Api(api).read_namespaced_deployment_status(
        dep["metadata"]["name"], owner.namespace
    )
    ready = now.status.ready_replicas or 0
    latest = read_owner(api, PLURAL, owner.namespace, owner.name) or body
    conditions = _progressing((latest.get("status") or {}).get("conditions"), generation)
    patch = _readiness(conditions, generation, spec.replicas, ready, choice, owner)
    patch.update(
        backend=choice.backend,
        kernel=choice.kernel,
        endpoint=endpoint(owner),
        selector=f"gptq.dev/quantized-model={owner.name}",
        observedGeneration=generation,
    )
    if status.get("kernel") != choice.kernel:
        events.append(
            (
                "Normal",
                "Deploying",
                f"serving with {choice.kernel} (tensor parallel {tp}) from {uri}",
            )
        )
    # not ready yet: look again shortly (Deployment events also update readiness)
    return Outcome(patch, events, retry_after=None if patch["phase"] == "Ready" else 5)


def _progressing(conditions: list[dict] | None, generation: int | None) -> list[dict]:
    """Stalled=False: nothing that needs a user's change blocks the model."""
    return set_condition(
        conditions, "Stalled", "False", "Progressing", "nothing blocks this model", generation
    )


def _readiness(
    conditions: list[dict] | None,
    generation: int | None,
    replicas: int,
    ready: int,
    choice: Choice,
    owner: Owner,
) -> dict[str, Any]:
    if replicas and ready >= replicas:
        message = f"{ready}/{replicas} replicas ready on {choice.kernel}"
        conditions = set_condition(conditions, "Ready", "True", "Ready", message, generation)
        conditions = set_condition(conditions, "Reconciling", "False", "Ready", message, generation)
        phase = "Ready"
    else:
        message = f"{ready}/{replicas} replicas ready"
        conditions = set_condition(conditions, "Ready", "False", "Deploying", message, generation)
        conditions = set_condition(
            conditions, "Reconciling", "True", "Deploying", message, generation
        )
        phase = "Deploying"
    return {"phase": phase, "conditions": conditions, "replicas": replicas, "readyReplicas": ready}


def observe_deployment(api: client.ApiClient, dep: dict) -> dict | None:
    """A serving Deployment changed: refresh readiness on its QuantizedModel.

    Returns the QuantizedModel when this change made it Ready, else None."""
    name = (dep["metadata"].get("labels") or {}).get("gptq.dev/quantized-model")
    namespace = dep["metadata"]["namespace"]
    qmodel = read_owner(api, PLURAL, namespace, name)
    if qmodel is None:
        return None
    objects = client.CustomObjectsApi(api)
    status = qmodel.get("status") or {}
    template = ((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}
    kernel = (template.get("annotations") or {}).get("gptq.dev/kernel")
    if not kernel:
        return None
    replicas = (dep.get("spec") or {}).get("replicas") or 0
    ready = (dep.get("status") or {}).get("readyReplicas") or 0
    choice = Choice(kernel.split("/")[0], kernel, None, None)
    owner = Owner(name, namespace, qmodel["metadata"]["uid"], kind="QuantizedModel")
    patch = _readiness(
        status.get("conditions"),
        qmodel["metadata"].get("generation"),
        replicas,
        ready,
        choice,
        owner,
    )
    if patch["phase"] != status.get("phase") or ready != status.get("readyReplicas"):
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": patch}
        )
    return qmodel if patch["phase"] == "Ready" else None
