"""Kopf handlers: decorators, typed arguments, one line of doc, delegation.

Run with ``kopf run -m gptq_operator.handlers --all-namespaces`` (the chart does).
Handlers never write ``spec``; Kopf keeps its own bookkeeping in annotations, not status.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes import client, config

from gptq_operator import metrics, models, quantization
from gptq_operator.api import GROUP, VERSION
from gptq_operator.settings import OperatorSettings
from gptq_operator.status import Outcome

_state: dict[str, Any] = {}


def _api() -> client.ApiClient:
    return _state["api"]


def _settings() -> OperatorSettings:
    return _state["settings"]


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Read settings once, connect to the API server, keep Kopf's state out of status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        _state["api"] = client.ApiClient()
    else:
        _state["api"] = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    _state["settings"] = OperatorSettings.from_env()
    _state["metrics"] = metrics.serve(_state["settings"].metrics_port)


def _metrics() -> metrics.Metrics:
    return _state["metrics"]


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in with the pod's ServiceAccount, or with $KUBECONFIG as it is when logging in."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.probe(id="apiserver")
def apiserver_reachable(**_: Any) -> str:
    """Liveness detail (``kopf run --liveness=...``): the API server answers us."""
    return client.VersionApi(_api()).get_code().git_version


def _apply(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status.items():
        patch.status[key] = value
    for type_, reason, message in outcome.events:
        (kopf.warn if type_ == "Warning" else kopf.info)(body, reason=reason, message=message)
    if outcome.permanent:
        raise kopf.PermanentError(outcome.permanent)
    if outcome.retry_after:
        raise kopf.TemporaryError(
            outcome.status.get("phase", "not ready"), delay=outcome.retry_after
        )


@kopf.on.create(GROUP, VERSION, "quantizationjobs")
@kopf.on.resume(GROUP, VERSION, "quantizationjobs")
@kopf.on.update(GROUP, VERSION, "quantizationjobs", field="spec")
def quantization_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Create the worker Job of a QuantizationJob (or say why no node can run it)."""
    with _metrics().reconcile("QuantizationJob"):
        _apply(quantization.reconcile(_api(), dict(body), _settings()), body, patch)


@kopf.on.event(GROUP, VERSION, "quantizationjobs")
def quantization_job_phase(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Keep the jobs-by-phase gauge current."""
    phase = None if type == "DELETED" else (body.get("status") or {}).get("phase") or "Pending"
    _metrics().job_phase(body["metadata"]["uid"], phase)


@kopf.on.event(GROUP, VERSION, "quantizedmodels")
def quantized_model_phase(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Keep the models-by-phase gauge current (the not-ready alert reads it)."""
    phase = None if type == "DELETED" else (body.get("status") or {}).get("phase") or "Pending"
    _metrics().model_phase(body["metadata"]["uid"], phase)


@kopf.on.event(
    "batch",
    "v1",
    "jobs",
    labels={
        "app.kubernetes.io/managed-by": "gptq-operator",
        "app.kubernetes.io/name": "gptq-worker",
    },
)
def worker_job(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Carry a worker Job's state to its QuantizationJob."""
    if type in (None, "ADDED", "MODIFIED"):
        quantization.observe_worker(_api(), _as_dict(body), _settings())


def _as_dict(body: kopf.Body) -> dict:
    return {
        "metadata": dict(body["metadata"]),
        "status": dict(body.get("status") or {}),
        "spec": dict(body.get("spec") or {}),
    }


@kopf.on.create(GROUP, VERSION, "quantizedmodels")
@kopf.on.resume(GROUP, VERSION, "quantizedmodels")
@kopf.on.update(GROUP, VERSION, "quantizedmodels", field="spec")
def quantized_model(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Serve a QuantizedModel's checkpoint once it exists, on GPUs that can run its kernel."""
    with _metrics().reconcile("QuantizedModel"):
        outcome = models.reconcile(_api(), dict(body), _settings())
        if outcome.status.get("phase") == "Ready":
            _metrics().model_ready(body["metadata"]["uid"], _age_seconds(body["metadata"]))
        _apply(outcome, body, patch)


def _age_seconds(metadata: dict) -> float:
    created = datetime.fromisoformat(metadata["creationTimestamp"].replace("Z", "+00:00"))
    return (datetime.now(timezone.utc) - created).total_seconds()


@kopf.on.event(
    "apps",
    "v1",
    "deployments",
    labels={
        "app.kubernetes.io/managed-by": "gptq-operator",
        "app.kubernetes.io/name": "gptq-serving",
    },
)
def serving_deployment(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Carry a serving Deployment's readiness to its QuantizedModel."""
    if type in (None, "ADDED", "MODIFIED"):
        ready = models.observe_deployment(_api(), _as_dict(body))
        if ready is not None:
            _metrics().model_ready(ready["metadata"]["uid"], _age_seconds(ready["metadata"]))
