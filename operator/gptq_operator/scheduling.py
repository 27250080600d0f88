"""Which nodes can run a pod that needs a GPU of some compute capability ("SM").

Node affinity compares label values as integers with ``Gt``/``Lt`` only, so "SM >= 8.9"
becomes two ORed terms: major > 8, or major = 8 and minor > 8 (docs/operations.md, "GPU nodes").
A range (TurboMind: 7.0 to 8.9) is the product of the lower and upper terms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gptq_compat.engines import default_kernels
from gptq_compat.rules import Kernel
from gptq_operator.settings import LabelKeys

SM = tuple[int, int]


def parse_sm(text: str) -> SM:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


class UnknownKernel(ValueError):
    """A kernel name that the serving rules do not know."""


def kernel_named(name: str) -> Kernel:
    """A kernel of the engine versions the default images run."""
    for kernel in default_kernels():
        if kernel.name == name:
            return kernel
    known = ", ".join(k.name for k in default_kernels())
    raise UnknownKernel(f"kernel {name!r} is not in the serving rules; known kernels: {known}")


def backend_sm_range(backend: str) -> tuple[SM | None, SM | None]:
    """The widest SM range that some kernel of ``backend`` runs on."""
    kernels = [k for k in default_kernels() if k.backend == backend and k.name != "vllm/cpu"]
    if any(k.min_sm is None for k in kernels):
        return None, None
    lowest = min(k.min_sm for k in kernels)
    highest = None if any(k.max_sm is None for k in kernels) else max(k.max_sm for k in kernels)
    return lowest, highest


def _expr(key: str, operator: str, value: int) -> dict:
    return {"key": key, "operator": operator, "values": [str(value)]}


def _at_least(sm: SM, keys: LabelKeys) -> list[list[dict]]:
    major, minor = sm
    if minor == 0:
        return [[_expr(keys.compute_major, "Gt", major - 1)]]
    return [
        [_expr(keys.compute_major, "Gt", major)],
        [_expr(keys.compute_major, "In", major), _expr(keys.compute_minor, "Gt", minor - 1)],
    ]


def _at_most(sm: SM, keys: LabelKeys) -> list[list[dict]]:
    major, minor = sm
    return [
        [_expr(keys.compute_major, "Lt", major)],
        [_expr(keys.compute_major, "In", major), _expr(keys.compute_minor, "Lt", minor + 1)],
    ]


def sm_node_selector_terms(min_sm: SM | None, max_sm: SM | None, keys: LabelKeys) -> list[dict]:
    """``nodeSelectorTerms`` (ORed) for min_sm <= SM <= max_sm; [] when unconstrained."""
    lower = _at_least(min_sm, keys) if min_sm else [[]]
    upper = _at_most(max_sm, keys) if max_sm else [[]]
    terms = [lo + hi for lo in lower for hi in upper]
    return [{"matchExpressions": t} for t in terms if t]


def node_sm(labels: dict[str, str], keys: LabelKeys) -> SM | None:
    try:
        return int(labels[keys.compute_major]), int(labels[keys.compute_minor])
    except (KeyError, ValueError):
        return None


def sm_in_range(sm: SM | None, min_sm: SM | None, max_sm: SM | None) -> bool:
    if min_sm is None and max_sm is None:
        return True
    if sm is None:
        return False
    return (min_sm is None or sm >= min_sm) and (max_sm is None or sm <= max_sm)


@dataclass(frozen=True)
class NodeVerdict:
    name: str
    fits: bool
    why: str  # e.g. "SM 7.5", "no GPU", "4 nvidia.com/gpu allocatable"


def _tolerated(taint: dict, tolerations: list[dict]) -> bool:
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value") == taint.get("value"):
            return True
    return False


def judge_nodes(
    nodes: list[dict],
    min_sm: SM | None,
    max_sm: SM | None,
    gpus: int,
    node_selector: dict[str, str],
    tolerations: list[dict],
    keys: LabelKeys,
    gpu_resource: str,
) -> list[NodeVerdict]:
    """Whether each node (a Node object as a dict) could ever run the pod, and why not."""
    verdicts = []
    for node in nodes:
        meta, spec, status = node["metadata"], node.get("spec", {}), node.get("status", {})
        labels = meta.get("labels", {})
        sm = node_sm(labels, keys)
        allocatable = int(status.get("allocatable", {}).get(gpu_resource, "0"))
        sm_text = f"SM {sm[0]}.{sm[1]}" if sm else "no GPU labels"
        why = sm_text
        fits = True
        if gpus and allocatable < gpus:
            fits, why = False, f"{sm_text}, {allocatable} {gpu_resource} allocatable"
        elif not sm_in_range(sm, min_sm, max_sm):
            fits = False
        elif any(labels.get(k) != v for k, v in node_selector.items()):
            fits, why = False, f"{sm_text}, nodeSelector does not match"
        elif spec.get("unschedulable"):
            fits, why = False, f"{sm_text}, cordoned"
        elif not all(_tolerated(t, tolerations) for t in spec.get("taints", [])):
            fits, why = False, f"{sm_text}, untolerated taint"
        verdicts.append(NodeVerdict(meta["name"], fits, why))
    return verdicts


def describe_requirement(min_sm: SM | None, max_sm: SM | None, gpus: int, gpu_resource: str) -> str:
    parts = []
    if min_sm and max_sm and min_sm == max_sm:
        parts.append(f"SM {min_sm[0]}.{min_sm[1]}")
    else:
        if min_sm:
            parts.append(f"SM >= {min_sm[0]}.{min_sm[1]}")
        if max_sm:
            parts.append(f"SM <= {max_sm[0]}.{max_sm[1]}")
    if gpus:
        parts.append(f"{gpus} {gpu_resource}")
    return " and ".join(parts) or "no GPU"


def node_summary(node: dict) -> dict:
    """What scheduling judgments read of a Node (its API form, camelCase): name, labels,
    unschedulable, taints and allocatable resources. The operator keeps these in a Kopf
    index fed by a watch, so reconciles do not list the nodes."""
    spec = node.get("spec") or {}
    return {
        "metadata": {
            "name": node["metadata"]["name"],
            "labels": dict(node["metadata"].get("labels") or {}),
        },
        "spec": {
            "unschedulable": spec.get("unschedulable"),
            "taints": [
                {"key": t["key"], "value": t.get("value"), "effect": t["effect"]}
                for t in spec.get("taints") or []
            ],
        },
        "status": {"allocatable": dict((node.get("status") or {}).get("allocatable") or {})},
    }


def list_nodes(api: Any) -> list[dict]:
    """Node summaries read from the API (where no watch keeps them)."""
    from kubernetes import client

    items = client.CoreV1Api(api).list_node(_preload_content=False)
    return [node_summary(n) for n in json.loads(items.data)["items"]]
