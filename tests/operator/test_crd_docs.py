"""Every field of both CRDs has a description, so ``kubectl explain`` documents all of it."""

from __future__ import annotations

import pytest
import yaml

from gptq_operator.crd import KINDS, crd, path_for


def _schema(kind) -> dict:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def undocumented(node: dict, path: str) -> list[str]:
    """Paths of the fields under ``node`` (itself included) that have no description."""
    missing = [] if node.get("description", "").strip() else [path]
    for name, sub in node.get("properties", {}).items():
        missing += undocumented(sub, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        sub = node.get(key)
        if isinstance(sub, dict):  # a list's items or a map's values: only their fields
            missing += [p for p in undocumented(sub, path + suffix) if p != path + suffix]
    return missing


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_spec_and_status_field_has_a_description(kind):
    schema = _schema(kind)
    missing = [
        p for part in ("spec", "status") for p in undocumented(schema["properties"][part], part)
    ]
    assert not missing, f"{len(missing)} {kind.kind} fields without a description:\n" + "\n".join(
        missing
    )


def _field(schema: dict, dotted: str) -> dict:
    node = schema
    for name in dotted.split("."):
        node = node.get("items", node)["properties"][name]
    return node


@pytest.mark.parametrize(
    ("kind", "field", "words"),
    [
        ("QuantizationJob", "spec.quantization.bits", "bits per weight"),
        ("QuantizationJob", "spec.quantization.groupSize", "-1"),
        ("QuantizationJob", "spec.resources.memory", "16Gi"),
        ("QuantizationJob", "spec.scheduling.tolerations.effect", "NoSchedule"),
        ("QuantizationJob", "status.progress.etaSeconds", "seconds"),
        ("QuantizationJob", "status.result.format.shapes.inFeatures", "input"),
        ("QuantizedModel", "spec.replicas", "0"),
        ("QuantizedModel", "status.conditions.reason", "CamelCase"),
    ],
)
def test_descriptions_reach_the_committed_yaml(kind, field, words):
    by_name = {k.kind: k for k in KINDS}
    committed = yaml.safe_load(path_for(by_name[kind]).read_text())
    schema = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert words in _field(schema, field).get("description", "")
