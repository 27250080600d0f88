"""Status conditions (metav1.Condition, kstatus-friendly) and what a reconcile decided.

Shared by both reconcilers: ``Ready`` and, where they apply, ``Reconciling`` and
``Stalled``; ``lastTransitionTime`` moves only when a condition's status does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from gptq_operator.api import GROUP, VERSION


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


def stalled(
    conditions: list[dict] | None, reason: str, message: str, generation: int | None
) -> list[dict]:
    """Ready False and Stalled True, both for ``reason``: a spec or result that will not
    work without a change."""
    conditions = set_condition(conditions, "Ready", "False", reason, message, generation)
    return set_condition(conditions, "Stalled", "True", reason, message, generation)


@dataclass
class Outcome:
    """What a reconcile decided: a status patch, and events to post."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]]  # (type Normal|Warning, reason, message)
    retry_after: float | None = None  # "not yet": try again later
    permanent: str | None = None  # a spec that can never work


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
