"""Kopf handlers: decorators, typed arguments, one line of doc, delegation.

Run with ``kopf run -m gptq_operator.handlers --all-namespaces`` (the chart does).
Handlers never write ``spec``; Kopf keeps its own bookkeeping in annotations, not status.
Every trigger of a resource (its own changes, its children's, a timer) calls the same
``sync`` of that resource, which writes the whole status (``status.publish``): there is one
status writer, and waiting is not an error (no retry loops, nothing logged as ERROR).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes import client, config

from gptq_operator import metrics, models, quantization
from gptq_operator.api import GROUP, VERSION
from gptq_operator.scheduling import node_summary
from gptq_operator.settings import OperatorSettings

_state: dict[str, Any] = {}
MANAGED = {"app.kubernetes.io/managed-by": "gptq-operator"}
RECHECK_S = 60  # nodes come and go: judgments that depend on them are made again this often


def _api() -> client.ApiClient:
    return _state["api"]


def _settings() -> OperatorSettings:
    return _state["settings"]


def _metrics() -> metrics.Metrics:
    return _state["metrics"]


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Read settings once, connect to the API server, keep Kopf's state out of status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # the operator posts its own events (aggregated, one source: status.record_event)
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        _state["api"] = client.ApiClient()
    else:
        _state["api"] = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    _state["settings"] = OperatorSettings.from_env()
    _state["metrics"] = metrics.serve(_state["settings"].metrics_port)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in with the pod's ServiceAccount, or with $KUBECONFIG as it is when logging in."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.probe(id="apiserver")
def apiserver_reachable(**_: Any) -> str:
    """Liveness detail (``kopf run --liveness=...``): the API server answers us."""
    return client.VersionApi(_api()).get_code().git_version


@kopf.index("", "v1", "nodes")
def nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, dict]:
    """The cluster's nodes as scheduling reads them, kept current by a watch (Kopf starts
    the handlers only once this index is complete), so reconciles never list nodes."""
    return {name: node_summary(dict(body))}


def _nodes(index: kopf.Index) -> list[dict]:
    return [summary for store in index.values() for summary in store]


def _sync_job(namespace: str, name: str | None, index: kopf.Index) -> None:
    if name:
        with _metrics().reconcile("QuantizationJob"):
            quantization.sync(_api(), namespace, name, _settings(), _nodes(index))


def _sync_model(namespace: str, name: str | None, index: kopf.Index) -> None:
    if name:
        with _metrics().reconcile("QuantizedModel"):
            models.sync(_api(), namespace, name, _settings(), _nodes(index))


@kopf.on.create(GROUP, VERSION, "quantizationjobs")
@kopf.on.resume(GROUP, VERSION, "quantizationjobs")
def quantization_job(name: str, namespace: str, nodes: kopf.Index, **_: Any) -> None:
    """Create the worker Job of a QuantizationJob (or say why no node can run it)."""
    _sync_job(namespace, name, nodes)


@kopf.timer(
    GROUP,
    VERSION,
    "quantizationjobs",
    interval=RECHECK_S,
    initial_delay=RECHECK_S,
    when=lambda status, **_: status.get("phase") not in ("Succeeded", "Failed"),
)
def quantization_job_recheck(name: str, namespace: str, nodes: kopf.Index, **_: Any) -> None:
    """Judge the nodes again for a job that waits for one."""
    _sync_job(namespace, name, nodes)


@kopf.on.event(GROUP, VERSION, "quantizationjobs")
def quantization_job_phase(
    body: kopf.Body, name: str, namespace: str, type: str | None, nodes: kopf.Index, **_: Any
) -> None:
    """Keep the jobs-by-phase gauge current; the models served from this job follow it."""
    phase = None if type == "DELETED" else (body.get("status") or {}).get("phase") or "Pending"
    _metrics().job_phase(body["metadata"]["uid"], phase)
    with _metrics().reconcile("QuantizedModel"):
        models.sync_dependents(_api(), namespace, name, _settings(), _nodes(nodes))


@kopf.on.event("batch", "v1", "jobs", labels={**MANAGED, "app.kubernetes.io/name": "gptq-worker"})
def worker_job(
    labels: kopf.Labels, namespace: str, type: str | None, nodes: kopf.Index, **_: Any
) -> None:
    """Carry a worker Job's state to its QuantizationJob (a deleted Job may be the one a
    re-created namesake waits for)."""
    if type in (None, "ADDED", "MODIFIED", "DELETED"):
        _sync_job(namespace, labels.get("gptq.dev/quantization-job"), nodes)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
def managed_pod(labels: kopf.Labels, namespace: str, nodes: kopf.Index, **_: Any) -> None:
    """A worker or serving pod changed (scheduled, pulling, crashing): its owner's status
    says so."""
    _sync_job(namespace, labels.get("gptq.dev/quantization-job"), nodes)
    _sync_model(namespace, labels.get("gptq.dev/quantized-model"), nodes)


@kopf.on.create(GROUP, VERSION, "quantizedmodels")
@kopf.on.resume(GROUP, VERSION, "quantizedmodels")
@kopf.on.update(GROUP, VERSION, "quantizedmodels", field="spec")
def quantized_model(name: str, namespace: str, nodes: kopf.Index, **_: Any) -> None:
    """Serve a QuantizedModel's checkpoint once it exists, on GPUs that can run its kernel."""
    _sync_model(namespace, name, nodes)


@kopf.timer(GROUP, VERSION, "quantizedmodels", interval=RECHECK_S, initial_delay=RECHECK_S)
def quantized_model_recheck(name: str, namespace: str, nodes: kopf.Index, **_: Any) -> None:
    """Choose again as nodes change (a refused model may become servable)."""
    _sync_model(namespace, name, nodes)


@kopf.on.event(GROUP, VERSION, "quantizedmodels")
def quantized_model_phase(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Keep the models-by-phase gauge current (the not-ready alert reads it)."""
    phase = None if type == "DELETED" else (body.get("status") or {}).get("phase") or "Pending"
    _metrics().model_phase(body["metadata"]["uid"], phase, _age_seconds(body["metadata"]))


def _age_seconds(metadata: dict) -> float:
    created = datetime.fromisoformat(metadata["creationTimestamp"].replace("Z", "+00:00"))
    return (datetime.now(timezone.utc) - created).total_seconds()


@kopf.on.event(
    "apps", "v1", "deployments", labels={**MANAGED, "app.kubernetes.io/name": "gptq-serving"}
)
def serving_deployment(
    labels: kopf.Labels, namespace: str, type: str | None, nodes: kopf.Index, **_: Any
) -> None:
    """Carry a serving Deployment's readiness to its QuantizedModel."""
    if type in (None, "ADDED", "MODIFIED", "DELETED"):
        _sync_model(namespace, labels.get("gptq.dev/quantized-model"), nodes)
