"""Reconciling a QuantizationJob: its worker Job, and its status from what the worker did.

It is longer than 400 lines because the reconcile is one decision from the job's
state to its status, read top to bottom.

Division of labour (documented in the README):
- the operator creates the worker's ServiceAccount, Role, ConfigMap and Job, owns
  ``status.phase``, ``conditions``, ``attempts``, ``result`` and ``lastFailure``;
- the worker may patch ``status.progress`` of its own QuantizationJob (its Role allows
  exactly that) and leaves its result as the pod's termination message, which the
  operator reads when the Job ends.

:func:`sync` is the one reconcile, run from every trigger (the job's creation, its worker
Job's or pods' changes, the periodic node re-check); it creates what is missing and
publishes the whole status from what it observes (``status.publish``). A job's spec is
immutable (CEL ``self == oldSelf``): a job runs once; another run is another job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from gptq_operator.api import QuantizationJobSpec, spec_errors
from gptq_operator.manifests import (
    Owner,
    UnsupportedSource,
    config_map,
    sm_range,
    worker_job,
    worker_rbac,
)
from gptq_operator.observe import crash_summary, pod_cause
from gptq_operator.observe import failure as _failure
from gptq_operator.policy import refuse_images, refuse_secrets
from gptq_operator.quality_gate import REMEDIATIONS, gate_verdict, spec_for_attempt
from gptq_operator.scheduling import (
    UnknownKernel,
    describe_requirement,
    judge_nodes,
    list_nodes,
)
from gptq_operator.settings import OperatorSettings
from gptq_operator.status import kstatus, now, publish, read_live, set_condition

PLURAL, KIND = "quantizationjobs", "QuantizationJob"


def _create(api: client.ApiClient, obj: dict) -> bool:
    """Create ``obj`` unless it exists; returns whether it was created."""
    kind, ns = obj["kind"], obj["metadata"].get("namespace")
    creators = {
        "ServiceAccount": lambda: client.CoreV1Api(api).create_namespaced_service_account(ns, obj),
        "ConfigMap": lambda: client.CoreV1Api(api).create_namespaced_config_map(ns, obj),
        "Role": lambda: client.RbacAuthorizationV1Api(api).create_namespaced_role(ns, obj),
        "RoleBinding": lambda: client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
            ns, obj
        ),
        "Job": lambda: client.BatchV1Api(api).create_namespaced_job(ns, obj),
    }
    try:
        creators[kind]()
        return True
    except ApiException as err:
        if err.status == 409:  # already there: a re-run handler or a restarted operator
            return False
        raise


def current_attempt(status: dict | None) -> int:
    attempts = (status or {}).get("attempts") or []
    return max((a["attempt"] for a in attempts), default=1)


def finished(status: dict | None, generation: int | None) -> bool:
    status = status or {}
    return (
        status.get("phase") in ("Succeeded", "Failed")
        and status.get("observedGeneration") == generation
    )


@dataclass(frozen=True)
class Plan:
    """What the spec calls for now: run (the Job exists or was created), or why not."""

    state: str  # "run" | "unschedulable" | "invalid" | "previous" (a namesake's Job remains)
    reason: str = ""
    message: str = ""
    job_name: str = ""


def sync(
    api: client.ApiClient,
    namespace: str,
    name: str,
    settings: OperatorSettings,
    nodes: list[dict] | None = None,
) -> dict | None:
    """Bring one QuantizationJob's children and status in line (module doc)."""
    body = read_live(api, PLURAL, namespace, name)
    if body is None:
        return None
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    if finished(status, generation):
        return body
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    attempt = current_attempt(status)
    try:
        spec = spec_for_attempt(QuantizationJobSpec.model_validate(body["spec"]), status, attempt)
    except ValidationError as err:  # admitted by the schema, refused by the models
        spec, decided = None, Plan("invalid", "InvalidSpec", spec_errors(err))
    else:
        model_bytes = (status.get("progress") or {}).get("modelBytes")
        decided = _plan(api, owner, spec, attempt, settings, nodes, model_bytes)

    def compute(latest: dict) -> dict[str, Any] | None:
        now_status = latest.get("status") or {}
        if latest["metadata"].get("generation") != generation or finished(now_status, generation):
            return None
        if current_attempt(now_status) != attempt:
            return None  # another trigger moved on to the next attempt meanwhile
        return _status(api, latest, spec, attempt, decided)

    stored = publish(api, PLURAL, KIND, namespace, name, compute)
    if stored is not None and current_attempt(stored.get("status")) > attempt:
        return sync(api, namespace, name, settings, nodes)  # remediation: the next attempt
    return stored


def _plan(
    api: client.ApiClient,
    owner: Owner,
    spec: QuantizationJobSpec,
    attempt: int,
    settings: OperatorSettings,
    nodes: list[dict] | None = None,
    model_bytes: int | None = None,
) -> Plan:
    """Create the current attempt's worker Job (and its settings and role) if no node
    rules it out; say why not otherwise."""
    refused = refuse_images(
        {"worker": spec.image.worker if spec.image else None}, settings
    ) or refuse_secrets(
        {
            "spec.model.secretRef": spec.model.secret_ref.name if spec.model.secret_ref else None,
            "spec.output.secretRef": (
                spec.output.secret_ref.name if spec.output.secret_ref else None
            ),
        },
        settings,
    )
    if refused:
        reason = "ImageNotAllowed" if refused.startswith("spec.image") else "SecretNotAllowed"
        return Plan("invalid", reason, refused)
    try:
        job = worker_job(owner, spec, settings, attempt, model_bytes)
        cm = config_map(owner, spec, attempt, settings.worker_gpu_device)
        min_sm, max_sm = sm_range(spec)
    except (UnsupportedSource, UnknownKernel) as err:
        return Plan("invalid", type(err).__name__, str(err))
    job_name = job["metadata"]["name"]
    existing = _read_job(api, owner.namespace, job_name)
    if existing is not None:
        owners = [r["uid"] for r in existing["metadata"].get("owner_references") or []]
        if owner.uid not in owners:  # left by a deleted job of the same name: wait for GC
            return Plan(
                "previous",
                "Pending",
                f"waiting for Job {job_name} of a deleted QuantizationJob of the same name to "
                f"be removed",
                job_name,
            )
        return Plan("run", job_name=job_name)
    nodes = list_nodes(api) if nodes is None else nodes
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    verdicts = judge_nodes(
        nodes,
        min_sm,
        max_sm,
        spec.resources.gpus,
        spec.scheduling.node_selector or {},
        tolerations,
        settings.labels,
        settings.gpu_resource,
    )
    if not any(v.fits for v in verdicts):
        need = describe_requirement(min_sm, max_sm, spec.resources.gpus, settings.gpu_resource)
        seen = ", ".join(f"{v.name} ({v.why})" for v in verdicts) or "no nodes"
        message = (
            f"no node can run the worker: it needs {need}; nodes seen: {seen}; add such a "
            f"node or change spec.scheduling (checked again each minute)"
        )
        return Plan("unschedulable", "NoCompatibleNodes", message, job_name)
    for obj in (*worker_rbac(owner), cm):
        _create(api, obj)
    _create(api, job)
    return Plan("run", job_name=job_name)


def _status(
    api: client.ApiClient,
    latest: dict,
    spec: QuantizationJobSpec | None,
    attempt: int,
    decided: Plan,
) -> dict[str, Any]:
    """The whole operator-owned status of a job that has not finished, from its worker Job
    and pods as they are now."""
    meta, status = latest["metadata"], latest.get("status") or {}
    generation = meta.get("generation")
    conditions = status.get("conditions")
    out: dict[str, Any] = {"observedGeneration": generation}
    if decided.state == "invalid":
        conditions = kstatus(conditions, "stalled", decided.reason, decided.message, generation)
        out.update(phase="Failed", conditions=conditions, completionTime=now())
        out["lastFailure"] = _failure(status, decided.reason, decided.message)
        return out
    if decided.state == "previous":
        conditions = kstatus(conditions, "progressing", decided.reason, decided.message, generation)
        out.update(phase="Pending", conditions=conditions)
        return out
    if decided.state == "unschedulable":
        conditions = set_condition(
            conditions, "Schedulable", "False", decided.reason, decided.message, generation
        )
        conditions = kstatus(conditions, "stalled", decided.reason, decided.message, generation)
        out.update(phase="Unschedulable", conditions=conditions)
        out["lastFailure"] = _failure(status, decided.reason, decided.message)
        return out
    assert spec is not None  # only an invalid spec has none, and it returned above
    conditions = set_condition(
        conditions, "Schedulable", "True", "CompatibleNodes", "a node can run the worker",
        generation,
    )  # fmt: skip
    if not status.get("startTime"):
        out["startTime"] = now()
    attempts = [dict(a) for a in status.get("attempts") or []] or [
        {"attempt": 1, "settings": "initial", "outcome": "Running"}
    ]
    out["attempts"] = attempts
    job = _read_job(api, meta["namespace"], decided.job_name)
    job_status = (job or {}).get("status") or {}
    job_conditions = {c["type"]: c for c in job_status.get("conditions") or []}
    if job_conditions.get("Complete", {}).get("status") == "True":
        return _completed(api, latest, spec, attempt, decided.job_name, out, conditions)
    if job_conditions.get("Failed", {}).get("status") == "True":
        message = _termination_message(api, meta["namespace"], decided.job_name) or {}
        reason = job_conditions["Failed"].get("reason") or "WorkerFailed"
        text = message.get("error") or job_conditions["Failed"].get("message") or reason
        _record(attempts, attempt, "Failed", message=text)
        out.update(
            phase="Failed",
            conditions=kstatus(conditions, "stalled", "WorkerFailed", text, generation),
            completionTime=now(),
            lastFailure=_failure(status, "WorkerFailed", text, message.get("exitCode")),
        )
        return out
    pods = (
        client.CoreV1Api(api)
        .list_namespaced_pod(meta["namespace"], label_selector=f"job-name={decided.job_name}")
        .items
    )
    cause = pod_cause(pods)
    if cause is not None:
        out.update(
            phase="Pending",
            conditions=kstatus(conditions, "stalled", cause.reason, cause.message, generation),
            lastFailure=_failure(status, cause.reason, cause.message, cause.exit_code),
        )
        return out
    running = any(p.status.phase == "Running" for p in pods)
    if running:
        what = f"worker Job {decided.job_name} is running (attempt {attempt})"
        phase = "Evaluating" if status.get("phase") == "Evaluating" else "Running"
        conditions = kstatus(conditions, "progressing", "Running", what, generation)
        out.update(phase=phase, conditions=conditions)
        return out
    # between the worker's pods: one ended, the Job has not said its last word yet
    ongoing = "Evaluating" if status.get("phase") == "Evaluating" else "Running"
    if any(p.status.phase == "Succeeded" for p in pods):
        what = f"the worker of Job {decided.job_name} finished; the Job is completing"
        conditions = kstatus(conditions, "progressing", "WorkerFinished", what, generation)
        out.update(phase=ongoing, conditions=conditions)
        return out
    ended = [p for p in pods if p.status.phase == "Failed" or p.metadata.deletion_timestamp]
    if ended and status.get("phase") in ("Running", "Evaluating"):
        what = (
            f"worker pod {ended[-1].metadata.name} ended before the work was done; Job "
            f"{decided.job_name} starts another, which resumes from the last finished layer"
        )
        conditions = kstatus(conditions, "progressing", "WorkerRestarting", what, generation)
        out.update(phase=ongoing, conditions=conditions)
        return out
    what = f"created worker Job {decided.job_name} (attempt {attempt}); its pod is starting"
    out.update(
        phase="Pending",
        conditions=kstatus(conditions, "progressing", "WorkerCreated", what, generation),
    )
    return out


def _completed(
    api: client.ApiClient,
    latest: dict,
    spec: QuantizationJobSpec,
    attempt: int,
    job_name: str,
    out: dict[str, Any],
    conditions: list[dict],
) -> dict[str, Any]:
    """The worker ended well: the quality gate decides between success, the next rung of
    the remediation ladder, and failure."""
    meta, status = latest["metadata"], latest.get("status") or {}
    generation = meta.get("generation")
    attempts = out["attempts"]
    message = _termination_message(api, meta["namespace"], job_name) or {}
    before, after = message.get("perplexityBefore"), message.get("perplexityAfter")
    passed, verdict = gate_verdict(spec.quality_gate, before, after)
    result = {
        "outputUri": spec.output.uri,
        "format": message.get("format"),
        "perplexityBefore": before,
        "perplexityAfter": after,
        "kernels": message.get("kernels"),
        "checkpointBytes": message.get("checkpointBytes"),
    }
    out["result"] = {k: v for k, v in result.items() if v is not None}
    ladder = (spec.quality_gate.remediation if spec.quality_gate else None) or []
    if passed:
        _record(attempts, attempt, "Succeeded", perplexity_after=after)
        out.update(
            phase="Succeeded",
            conditions=kstatus(conditions, "ready", "Succeeded", verdict, generation),
            completionTime=now(),
            progress={**(status.get("progress") or {}), "message": "done"},
        )
    elif attempt <= len(ladder):
        step = ladder[attempt - 1]
        _record(attempts, attempt, "QualityGateFailed", perplexity_after=after, message=verdict)
        attempts.append({"attempt": attempt + 1, "settings": step, "outcome": "Running"})
        text = f"{verdict}; retrying with {REMEDIATIONS[step][0]}"
        out.update(
            phase="Pending",
            conditions=kstatus(conditions, "progressing", "QualityGateFailed", text, generation),
        )
    else:
        _record(attempts, attempt, "QualityGateFailed", perplexity_after=after, message=verdict)
        out.update(
            phase="Failed",
            conditions=kstatus(conditions, "stalled", "QualityGateFailed", verdict, generation),
            completionTime=now(),
            lastFailure=_failure(status, "QualityGateFailed", verdict),
        )
    return out


def _read_job(api: client.ApiClient, namespace: str, name: str) -> dict | None:
    try:
        return client.BatchV1Api(api).read_namespaced_job(name, namespace).to_dict()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _record(
    attempts: list[dict],
    attempt: int,
    outcome: str,
    perplexity_after: float | None = None,
    message: str | None = None,
) -> None:
    for a in attempts:
        if a["attempt"] == attempt:
            a["outcome"] = outcome
            if perplexity_after is not None:
                a["perplexityAfter"] = perplexity_after
            if message:
                a["message"] = message[:1000]
            return
    attempts.append({"attempt": attempt, "settings": "initial", "outcome": outcome})


def _termination_message(api: client.ApiClient, namespace: str, job_name: str) -> dict | None:
    pods = (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector=f"job-name={job_name}")
        .items
    )
    for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp, reverse=True):
        for cs in pod.status.container_statuses or []:
            terminated = cs.state.terminated if cs.state else None
            if cs.name == "worker" and terminated and terminated.message:
                try:
                    return json.loads(terminated.message)
                except json.JSONDecodeError:
                    # not the worker's own report: the tail of its log (a crash)
                    return {
                        "error": crash_summary(terminated.message, pod.metadata.name),
                        "exitCode": terminated.exit_code,
                    }
    return None
