"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic models in ``api.py``.

Kubernetes wants a structural OpenAPI v3 schema: no ``$ref`` (inlined here), ``nullable``
instead of ``anyOf [T, null]``, boolean ``exclusiveMinimum``, no ``additionalProperties:
false`` beside ``properties``. Run ``python -m gptq_operator.crd`` to rewrite the files; a
test fails when they drift from the models.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from gptq_operator.api import (
    GROUP,
    VERSION,
    QuantizationJobSpec,
    QuantizationJobStatus,
    QuantizedModelSpec,
    QuantizedModelStatus,
)

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[dict, ...]
    name_rule: tuple[str, str]  # CEL on metadata.name, with its message
    scale: bool = False


def _col(
    name: str, path: str, type_: str = "string", priority: int = 0, description: str = ""
) -> dict:
    col = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        col["priority"] = priority
    if description:
        col["description"] = description
    return col


AGE = _col("Age", ".metadata.creationTimestamp", "date")
READY_REASON = _col(
    "Reason", '.status.conditions[?(@.type=="Ready")].reason', description="why (not) Ready"
)

# The name is a label value of every child object (63 characters at most); child names
# (``<name>-worker-<attempt>``, ``<name>-<backend>``) are shortened with a hash by
# manifests.child_name, so they set no lower limit. A QuantizedModel's name is also its
# Service's name, itself at most 63.
NAME_LIMIT = 63

KINDS = (
    Kind(
        kind="QuantizationJob",
        plural="quantizationjobs",
        singular="quantizationjob",
        short="qjob",
        spec=QuantizationJobSpec,
        status=QuantizationJobStatus,
        columns=(
            _col("Phase", ".status.phase"),
            _col("Progress", ".status.progress.message"),
            _col(
                "ETA-Seconds",
                ".status.progress.etaSeconds",
                "number",
                description="estimated seconds until the worker is done",
            ),
            _col("Model", ".spec.model.uri"),
            _col("Bits", ".spec.quantization.bits", "integer"),
            _col("Group", ".spec.quantization.groupSize", "integer", 1),
            _col("PPL-Before", ".status.result.perplexityBefore", "number", 1),
            _col("PPL-After", ".status.result.perplexityAfter", "number", 1),
            _col("Output", ".spec.output.uri", priority=1),
            READY_REASON,
            AGE,
        ),
        name_rule=(
            f"self.metadata.name.size() <= {NAME_LIMIT}",
            f"metadata.name must be at most {NAME_LIMIT} characters: the worker's objects "
            "carry it as a label value",
        ),
    ),
    Kind(
        kind="QuantizedModel",
        plural="quantizedmodels",
        singular="quantizedmodel",
        short="qmodel",
        spec=QuantizedModelSpec,
        status=QuantizedModelStatus,
        scale=True,
        columns=(
            _col("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _col("Desired", ".spec.replicas", "integer", description="replicas asked for"),
            _col(
                "Ready-Replicas",
                ".status.readyReplicas",
                "integer",
                description="replicas ready for requests",
            ),
            READY_REASON,
            _col("Backend", ".status.backend"),
            _col("Kernel", ".status.kernel", priority=1),
            _col("Endpoint", ".status.endpoint"),
            _col("Source", ".spec.source.job", priority=1),
            AGE,
        ),
        name_rule=(
            f"self.metadata.name.size() <= {NAME_LIMIT}",
            f"metadata.name must be at most {NAME_LIMIT} characters: it names the model's "
            "Service and is a label value of its pods",
        ),
    ),
)


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as a Kubernetes structural schema."""
    schema = copy.deepcopy(schema)
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            return walk({**target, **{k: v for k, v in node.items() if k != "$ref"}})
        if node.get("x-kubernetes-int-or-string"):
            return {
                k: v
                for k, v in node.items()
                if k in ("x-kubernetes-int-or-string", "description", "default")
            }
        nullable = False
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            nullable = len(options) < len(node["anyOf"])
            if len(options) != 1:
                raise ValueError(f"cannot express anyOf {node['anyOf']} structurally")
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**walk(options[0]), **rest}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title":
                continue
            if key == "additionalProperties":
                if value is True:  # dict[str, Any]: keep whatever the user wrote
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif value is not False:
                    out[key] = walk(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            elif key == "const":
                out["enum"] = [value]
            elif key == "properties":
                out[key] = {name: walk(sub) for name, sub in value.items()}
            else:
                out[key] = walk(value)
        if nullable:
            out["nullable"] = True
        if out.get("default", 0) is None:
            del out["default"]
        _default_nested_objects(out)
        if "conditions" in out.get("properties", {}):
            out["properties"]["conditions"].update(
                {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
            )
        return out

    return walk(schema)


def _default_nested_objects(node: dict) -> None:
    """``default: {}`` on optional, non-nullable objects whose fields all have defaults,
    so the API server fills in their defaults even when the user leaves them out."""
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        if (
            name not in required
            and sub.get("type") == "object"
            and not sub.get("nullable")
            and "properties" in sub
            and not sub.get("required")
            and "default" not in sub
        ):
            sub["default"] = {}


def crd(kind: Kind) -> dict[str, Any]:
    spec_schema = structural(kind.spec.model_json_schema(by_alias=True))
    status_schema = structural(kind.status.model_json_schema(by_alias=True))
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "gptq-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short],
                "categories": ["gptq"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": list(kind.columns),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (kind.spec.__doc__ or kind.kind).strip().splitlines()[0],
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {"rule": kind.name_rule[0], "message": kind.name_rule[1]}
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    header = (
        "# Generated from operator/gptq_operator/api.py by `python -m gptq_operator.crd`."
        " Do not edit.\n"
    )
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=100)


def path_for(kind: Kind, directory: Path = CRD_DIR) -> Path:
    return directory / f"{kind.plural}.{GROUP}.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CRD_DIR)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        path_for(kind, args.out).write_text(render(kind))
        print(f"wrote {path_for(kind, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
