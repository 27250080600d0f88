"""Status: conditions (metav1.Condition, kstatus-conformant), the one status writer, and
events aggregated per cause.

Every status change of both kinds goes through :func:`publish`: read the object, compute
the whole status the operator owns from what is observed now, write it with the read's
``resourceVersion`` as a precondition, and on a conflict read and compute again. Two
triggers that race (a Deployment event and a spec change) therefore cannot leave a status
computed from older observations on top of a newer one.

Events are posted only on transitions of the ``Ready`` reason and are aggregated: one
Event object per (object, reason), whose ``count`` grows when the cause comes back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from gptq_operator.api import GROUP, VERSION
from gptq_operator.policy import scrub

log = logging.getLogger(__name__)
COMPONENT = "gptq-operator"
# Ready reasons that are plain progress; every other reason is posted as a Warning
NORMAL_REASONS = {
    "Pending",
    "Running",
    "WorkerCreated",
    "Succeeded",
    "Remediating",
    "WaitingForCheckpoint",
    "Deploying",
    "Ready",
}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict]:
    """Conditions with ``type_`` set; lastTransitionTime changes only when status does."""
    out = [dict(c) for c in conditions or []]
    for c in out:
        if c["type"] == type_:
            if c["status"] != status:
                c["lastTransitionTime"] = now()
            c.update(status=status, reason=reason, message=message, observedGeneration=generation)
            return out
    out.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now(),
            "observedGeneration": generation,
        }
    )
    return out


def kstatus(
    conditions: list[dict] | None,
    state: str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict]:
    """``Ready``, ``Reconciling`` and ``Stalled`` for one of three states, always all three,
    so that kstatus readers (Flux, Argo CD, ``kubectl wait``) never guess:

    - ``ready``: Ready True, Reconciling False, Stalled False;
    - ``progressing``: Ready False, Reconciling True, Stalled False;
    - ``stalled``: Ready False, Reconciling False, Stalled True (needs a change by someone).
    """
    ready = "True" if state == "ready" else "False"
    reconciling = "True" if state == "progressing" else "False"
    stuck = "True" if state == "stalled" else "False"
    conditions = set_condition(conditions, "Ready", ready, reason, message, generation)
    conditions = set_condition(conditions, "Reconciling", reconciling, reason, message, generation)
    quiet = "nothing blocks this resource"
    return set_condition(
        conditions,
        "Stalled",
        stuck,
        reason if stuck == "True" else "Progressing",
        message if stuck == "True" else quiet,
        generation,
    )


def condition(status: dict | None, type_: str) -> dict:
    return next((c for c in (status or {}).get("conditions") or [] if c["type"] == type_), {})


def read_owner(api: client.ApiClient, plural: str, namespace: str, name: str | None) -> dict | None:
    """The gptq.dev object a child belongs to, or None when it is gone (or unnamed)."""
    if not name:
        return None
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def read_live(api: client.ApiClient, plural: str, namespace: str, name: str) -> dict | None:
    """The object to reconcile, or None when it is gone or being deleted."""
    body = read_owner(api, plural, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    return body


Compute = Callable[[dict], dict[str, Any] | None]


def publish(
    api: client.ApiClient, plural: str, kind: str, namespace: str, name: str, compute: Compute
) -> dict | None:
    """Write the status ``compute`` makes of the object as it is now (see the module doc).

    ``compute`` gets the freshly read object and returns the status fields the operator
    owns (None: nothing to write). Returns the object as stored afterwards, or None when it
    is gone. Posts an event when the ``Ready`` reason changed."""
    objects = client.CustomObjectsApi(api)
    for _ in range(20):
        obj = read_owner(api, plural, namespace, name)
        if obj is None:
            return None
        current = obj.get("status") or {}
        wanted = compute(obj)
        if wanted is not None:
            wanted = _scrubbed(wanted)
        if wanted is None or all(current.get(k) == v for k, v in wanted.items()):
            return obj
        body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}}
        try:
            stored = objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {**body, "status": wanted}
            )
        except ApiException as err:
            if err.status in (404, 409):  # gone, or changed since it was read: again
                continue
            raise
        before, after = condition(current, "Ready"), condition(stored.get("status"), "Ready")
        changed = (before.get("reason"), before.get("status")) != (
            after.get("reason"),
            after.get("status"),
        )
        if after.get("reason") and changed:
            type_ = "Normal" if after["reason"] in NORMAL_REASONS else "Warning"
            try:
                record_event(api, stored, kind, type_, after["reason"], after.get("message") or "")
            except ApiException as err:  # an event is a courtesy: the status is written
                log.warning("no event for %s %s/%s: %s", kind, namespace, name, err.reason)
        return stored
    raise RuntimeError(f"{kind} {namespace}/{name}: status kept changing while it was written")


def _scrubbed(value: Any) -> Any:
    """``value`` with credentials taken out of every string (policy.scrub)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def record_event(
    api: client.ApiClient, obj: dict, kind: str, type_: str, reason: str, message: str
) -> None:
    """One Event per (object, reason): created the first time, counted after that."""
    meta = obj["metadata"]
    digest = hashlib.sha256(f"{meta['uid']}/{reason}".encode()).hexdigest()[:12]
    name = f"{meta['name'][:200]}.{digest}"
    core = client.CoreV1Api(api)
    stamp = now()
    try:
        core.create_namespaced_event(
            meta["namespace"],
            {
                "metadata": {"name": name, "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": kind,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "type": type_,
                "reason": reason,
                "message": scrub(message)[:1024],
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "source": {"component": COMPONENT},
            },
        )
        return
    except ApiException as err:
        if err.status != 409:
            raise
    for _ in range(5):  # seen before: count it
        try:
            seen = core.read_namespaced_event(name, meta["namespace"])
            core.patch_namespaced_event(
                name,
                meta["namespace"],
                {
                    "metadata": {"resourceVersion": seen.metadata.resource_version},
                    "count": (seen.count or 1) + 1,
                    "lastTimestamp": stamp,
                    "message": scrub(message)[:1024],
                    "type": type_,
                },
            )
            return
        except ApiException as err:
            if err.status != 409:
                raise
