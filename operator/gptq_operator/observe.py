"""What the operator's pods say about themselves: the cause that keeps them from running.

Read from the pods' own status (scheduling condition, container waiting and terminated
states), the same fields ``kubectl describe pod`` shows; each cause carries the fix.
Shared by both reconcilers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gptq_operator.status import now

IMAGE_PULL = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
_PVC = re.compile(r'persistentvolumeclaim "([^"]+)" not found')
_SECRET = re.compile(r'secret "([^"]+)" not found')


@dataclass(frozen=True)
class Cause:
    """Why a pod does not run: a reason (CamelCase), a message that names the fix."""

    reason: str
    message: str
    exit_code: int | None = None

    def record(self) -> dict[str, Any]:
        """The ``lastFailure`` entry of a status."""
        out: dict[str, Any] = {"reason": self.reason, "message": self.message, "time": now()}
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        return out


def _get(obj: Any, key: str) -> Any:
    """A field of a client model object or of a plain dict (both shapes reach here)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)
        return obj.get(key, obj.get(camel))
    return getattr(obj, key, None)


def pod_cause(pods: list[Any]) -> Cause | None:
    """The first cause found among ``pods`` (newest first), or None when none is stuck."""
    ordered = sorted(
        pods,
        key=lambda p: str(_get(_get(p, "metadata"), "creation_timestamp") or ""),
        reverse=True,
    )
    for pod in ordered:
        if _get(_get(pod, "metadata"), "deletion_timestamp"):
            continue
        name = _get(_get(pod, "metadata"), "name")
        status = _get(pod, "status")
        for cond in _get(status, "conditions") or []:
            if _get(cond, "type") == "PodScheduled" and _get(cond, "status") == "False":
                message = _get(cond, "message") or ""
                if m := _PVC.search(message):
                    return Cause(
                        "PVCNotFound",
                        f"pod {name} cannot start: PersistentVolumeClaim {m.group(1)} does not "
                        f"exist in this namespace; create it (see docs/operations.md) or fix "
                        f"the pvc:// URI",
                    )
                if _get(cond, "reason") == "Unschedulable":
                    return Cause(
                        "Unschedulable",
                        f"pod {name} cannot be scheduled: {message}; free or add a node that "
                        f"fits, or change spec.scheduling",
                    )
        statuses = [*(_get(status, "init_container_statuses") or [])]
        statuses += _get(status, "container_statuses") or []
        for cs in statuses:
            container = _get(cs, "name")
            waiting = _get(_get(cs, "state"), "waiting")
            reason = _get(waiting, "reason") or ""
            detail = _get(waiting, "message") or ""
            if reason in IMAGE_PULL:
                return Cause(
                    "ImagePullBackOff",
                    f"pod {name}: image {_get(cs, 'image')} of container {container} cannot be "
                    f"pulled ({reason}{': ' + detail if detail else ''}); fix the image in the "
                    f"spec or the operator's settings, or the registry credentials",
                )
            if reason == "CreateContainerConfigError":
                if m := _SECRET.search(detail):
                    return Cause(
                        "MissingSecret",
                        f"pod {name}: Secret {m.group(1)} does not exist in this namespace; "
                        f"create it or fix the secret reference in the spec",
                    )
                return Cause(
                    "CreateContainerConfigError",
                    f"pod {name}: container {container} cannot be created: {detail}",
                )
            if reason == "CrashLoopBackOff":
                last = _get(_get(cs, "last_state"), "terminated")
                code = _get(last, "exit_code")
                said = (_get(last, "message") or _get(last, "reason") or "").strip()
                restarts = _get(cs, "restart_count") or 0
                return Cause(
                    "CrashLoopBackOff",
                    f"pod {name}: container {container} keeps exiting (exit code {code}, "
                    f"{restarts} restarts){': ' + said[-500:] if said else ''}; "
                    f"see kubectl logs {name} -c {container} --previous",
                    exit_code=code,
                )
    return None


def failure(status: dict, reason: str, message: str, exit_code: int | None = None) -> dict:
    """The ``lastFailure`` of a status: kept as it was while the same cause lasts, so its
    time is when the cause was first seen."""
    last = status.get("lastFailure") or {}
    if last.get("reason") == reason and last.get("message") == message:
        return last
    return Cause(reason, message, exit_code).record()


def crash_summary(log_tail: str, pod: str) -> str:
    """What a container that died without its own report said, for a status message: a
    Python traceback becomes its last line (the exception), anything else its last lines,
    with where to read the rest."""
    lines = [line.rstrip() for line in log_tail.strip().splitlines() if line.strip()]
    if not lines:
        return f"the worker exited without a message; see kubectl logs {pod}"
    # FallbackToLogsOnError keeps the last 2 KiB: the traceback's head may be cut off
    if any(line.startswith(("Traceback (most recent", '  File "')) for line in lines):
        return f"the worker crashed: {lines[-1].strip()[:500]} (traceback: kubectl logs {pod})"
    return f"{' / '.join(lines[-3:])[-700:]} (kubectl logs {pod})"
