"""Reconciling a QuantizationJob: its worker Job, and its status from what the worker did.

Division of labour (documented in the README):
- the operator creates the worker's ServiceAccount, Role, ConfigMap and Job, owns
  ``status.phase``, ``conditions``, ``attempts`` and ``result``;
- the worker may patch ``status.progress`` of its own QuantizationJob (its Role allows
  exactly that) and leaves its result as the pod's termination message, which the
  operator reads when the Job ends.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from gptq_operator.api import GROUP, VERSION, QuantizationJobSpec
from gptq_operator.manifests import (
    Owner,
    UnsupportedSource,
    config_map,
    sm_range,
    worker_job,
    worker_rbac,
)
from gptq_operator.quality_gate import REMEDIATIONS, gate_verdict, spec_for_attempt
from gptq_operator.scheduling import UnknownKernel, describe_requirement, judge_nodes
from gptq_operator.settings import OperatorSettings
from gptq_operator.status import Outcome, now, read_owner, set_condition, stalled

PLURAL = "quantizationjobs"


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


def reconcile(api: client.ApiClient, body: dict, settings: OperatorSettings) -> Outcome:
    """Make sure the worker Job of the current attempt exists, or say why it cannot."""
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    spec = QuantizationJobSpec.model_validate(body["spec"])
    attempt = current_attempt(status)
    spec = spec_for_attempt(spec, status, attempt)
    conditions = status.get("conditions")
    if (
        status.get("phase") in ("Succeeded", "Failed")
        and status.get("observedGeneration") == generation
    ):
        return Outcome({}, [])
    try:
        job = worker_job(owner, spec, settings, attempt)
        cm = config_map(owner, spec, attempt)
        min_sm, max_sm = sm_range(spec)
    except (UnsupportedSource, UnknownKernel) as err:
        reason = type(err).__name__
        conditions = stalled(conditions, reason, str(err), generation)
        return Outcome(
            {"phase": "Failed", "conditions": conditions, "observedGeneration": generation},
            [("Warning", reason, str(err))],
            permanent=str(err),
        )

    existing = _read_job(api, owner.namespace, job["metadata"]["name"])
    if existing is None:
        nodes = client.CoreV1Api(api).list_node().to_dict()["items"]
        nodes = [_node_as_manifest(n) for n in nodes]
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
            message = f"no node can run the worker: it needs {need}; nodes seen: {seen}"
            conditions = set_condition(
                conditions, "Schedulable", "False", "NoCompatibleNodes", message, generation
            )
            conditions = set_condition(
                conditions, "Ready", "False", "NoCompatibleNodes", message, generation
            )
            return Outcome(
                {
                    "phase": "Unschedulable",
                    "conditions": conditions,
                    "observedGeneration": generation,
                },
                [("Warning", "NoCompatibleNodes", message)],
                retry_after=60,
            )
        for obj in (*worker_rbac(owner), cm):
            _create(api, obj)
        created = _create(api, job)
        events = (
            [
                (
                    "Normal",
                    "WorkerCreated",
                    f"created Job {job['metadata']['name']} (attempt {attempt})",
                )
            ]
            if created
            else []
        )
    else:
        events = []
    fits_message = "a node can run the worker"
    conditions = set_condition(
        conditions, "Schedulable", "True", "CompatibleNodes", fits_message, generation
    )
    conditions = set_condition(
        conditions,
        "Ready",
        "False",
        "Running",
        f"worker Job {job['metadata']['name']} is running",
        generation,
    )
    conditions = set_condition(
        conditions, "Reconciling", "True", "Running", "quantizing", generation
    )
    patch: dict[str, Any] = {"conditions": conditions, "observedGeneration": generation}
    if status.get("phase") in (None, "Pending", "Unschedulable"):
        patch["phase"] = "Pending"
    if not status.get("startTime"):
        patch["startTime"] = now()
    if not status.get("attempts"):
        patch["attempts"] = [{"attempt": 1, "settings": "initial", "outcome": "Running"}]
    return Outcome(patch, events)


def _node_as_manifest(node: dict) -> dict:
    """The python client's snake_case node dict, in the shape judge_nodes reads."""
    spec = node.get("spec") or {}
    return {
        "metadata": {
            "name": node["metadata"]["name"],
            "labels": node["metadata"].get("labels") or {},
        },
        "spec": {
            "unschedulable": spec.get("unschedulable"),
            "taints": [
                {"key": t["key"], "value": t.get("value"), "effect": t["effect"]}
                for t in spec.get("taints") or []
            ],
        },
        "status": {"allocatable": (node.get("status") or {}).get("allocatable") or {}},
    }


def _read_job(api: client.ApiClient, namespace: str, name: str) -> dict | None:
    try:
        return client.BatchV1Api(api).read_namespaced_job(name, namespace).to_dict()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def observe_worker(api: client.ApiClient, job: dict, settings: OperatorSettings) -> None:
    """A worker Job changed: carry its state to the owning QuantizationJob's status."""
    labels = job["metadata"].get("labels") or {}
    name, namespace = labels.get("gptq.dev/quantization-job"), job["metadata"]["namespace"]
    attempt = int(labels.get("gptq.dev/attempt", "1"))
    qjob = read_owner(api, PLURAL, namespace, name)
    if qjob is None:
        return
    objects = client.CustomObjectsApi(api)
    status = qjob.get("status") or {}
    if attempt != current_attempt(status) or status.get("phase") in ("Succeeded", "Failed"):
        return
    generation = qjob["metadata"].get("generation")
    spec = QuantizationJobSpec.model_validate(qjob["spec"])
    job_conditions = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}
    conditions = status.get("conditions")
    patch: dict[str, Any] = {}
    events: list[tuple[str, str, str]] = []
    complete = job_conditions.get("Complete", {}).get("status") == "True"
    failed = job_conditions.get("Failed", {}).get("status") == "True"
    if not complete and not failed:
        if (job.get("status") or {}).get("active") and status.get("phase") == "Pending":
            patch["phase"] = "Running"
        if patch:
            _patch_status(objects, namespace, name, patch)
        return

    message = _termination_message(api, namespace, job["metadata"]["name"])
    attempts = [dict(a) for a in status.get("attempts") or []]
    if failed:
        reason = job_conditions["Failed"].get("reason") or "WorkerFailed"
        text = (message or {}).get("error") or job_conditions["Failed"].get("message") or reason
        _record(attempts, attempt, "Failed", message=text)
        conditions = stalled(conditions, "WorkerFailed", text, generation)
        conditions = set_condition(
            conditions, "Reconciling", "False", "WorkerFailed", text, generation
        )
        patch.update(phase="Failed", conditions=conditions, attempts=attempts, completionTime=now())
        events.append(("Warning", "WorkerFailed", text))
    else:
        message = message or {}
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
        patch["result"] = {k: v for k, v in result.items() if v is not None}
        ladder = (spec.quality_gate.remediation if spec.quality_gate else None) or []
        if passed:
            _record(attempts, attempt, "Succeeded", perplexity_after=after)
            conditions = set_condition(
                conditions, "Ready", "True", "Succeeded", verdict, generation
            )
            conditions = set_condition(
                conditions, "Reconciling", "False", "Succeeded", verdict, generation
            )
            patch.update(
                phase="Succeeded",
                conditions=conditions,
                attempts=attempts,
                completionTime=now(),
                progress={**(status.get("progress") or {}), "message": "done"},
            )
            events.append(("Normal", "Succeeded", verdict))
        elif attempt <= len(ladder):
            step = ladder[attempt - 1]
            _record(attempts, attempt, "QualityGateFailed", perplexity_after=after, message=verdict)
            attempts.append({"attempt": attempt + 1, "settings": step, "outcome": "Running"})
            conditions = set_condition(
                conditions,
                "Reconciling",
                "True",
                "Remediating",
                f"{verdict}; retrying with {REMEDIATIONS[step][0]}",
                generation,
            )
            patch.update(phase="Pending", conditions=conditions, attempts=attempts)
            events.append(
                (
                    "Warning",
                    "QualityGateFailed",
                    f"{verdict}; retrying with {REMEDIATIONS[step][0]}",
                )
            )
        else:
            _record(attempts, attempt, "QualityGateFailed", perplexity_after=after, message=verdict)
            conditions = stalled(conditions, "QualityGateFailed", verdict, generation)
            patch.update(
                phase="Failed", conditions=conditions, attempts=attempts, completionTime=now()
            )
            events.append(("Warning", "QualityGateFailed", verdict))
    _patch_status(objects, namespace, name, patch)
    for type_, reason, text in events:
        _post_event(api, qjob, type_, reason, text)
    if patch.get("phase") == "Pending":  # remediation: create the next attempt's Job now
        qjob = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        outcome = reconcile(api, qjob, settings)
        _patch_status(objects, namespace, name, outcome.status)


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
                    return {"error": terminated.message[-1000:]}
    return None


def _patch_status(objects: client.CustomObjectsApi, namespace: str, name: str, patch: dict) -> None:
    if patch:
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": patch}
        )


def _post_event(api: client.ApiClient, qjob: dict, type_: str, reason: str, message: str) -> None:
    meta = qjob["metadata"]
    client.CoreV1Api(api).create_namespaced_event(
        meta["namespace"],
        {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "QuantizationJob",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1000],
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "count": 1,
            "source": {"component": "gptq-operator"},
        },
    )
