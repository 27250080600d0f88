"""The CRDs are generated from the API models, structural, and never drift."""

from __future__ import annotations

import json

import pytest
import yaml

from gptq_operator.crd import KINDS, crd, path_for, render


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_committed_crds_match_the_models(kind):
    committed = path_for(kind).read_text()
    assert committed == render(kind), (
        f"{path_for(kind).name} is out of date: run `python -m gptq_operator.crd`"
    )


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind):
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if not isinstance(node, dict):
            continue
        assert "$ref" not in node and "anyOf" not in node, path
        assert "title" not in node or path.endswith(".properties"), path
        if "properties" in node:
            assert node.get("type") == "object", path
            assert node.get("additionalProperties") is not False, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node and not path.endswith(".properties"):
                assert isinstance(node[bound], bool), path


def test_names_columns_and_subresources():
    qjob, qmodel = (crd(k) for k in KINDS)
    assert qjob["spec"]["names"]["shortNames"] == ["qjob"]
    assert qmodel["spec"]["names"]["categories"] == ["gptq"]
    version = qmodel["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {
        k["spec"]["names"]["kind"]: {
            c["name"]: c["jsonPath"] for c in k["spec"]["versions"][0]["additionalPrinterColumns"]
        }
        for k in (qjob, qmodel)
    }
    assert list(columns["QuantizationJob"])[:5] == [
        "Phase",
        "Progress",
        "ETA-Seconds",
        "Model",
        "Bits",
    ]
    assert columns["QuantizationJob"]["ETA-Seconds"] == ".status.progress.etaSeconds"
    ready_reason = '.status.conditions[?(@.type=="Ready")].reason'
    assert (
        columns["QuantizationJob"]["Reason"] == columns["QuantizedModel"]["Reason"] == ready_reason
    )
    assert columns["QuantizedModel"]["Desired"] == ".spec.replicas"
    assert columns["QuantizedModel"]["Ready-Replicas"] == ".status.readyReplicas"
    for k in (qjob, qmodel):
        root = k["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert root["x-kubernetes-validations"][0]["rule"] == "self.metadata.name.size() <= 63"
    spec = qjob["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    quantization = spec["properties"]["quantization"]
    assert quantization["default"] == {}  # so the server fills bits=4, groupSize=128, ...
    bits = quantization["properties"]["bits"]
    assert {k: bits[k] for k in ("default", "enum", "type")} == {
        "default": 4,
        "enum": [2, 3, 4, 8],
        "type": "integer",
    }
    rules = json.dumps(spec["x-kubernetes-validations"])
    assert "output.uri must differ" in rules and "calibration.dataset" in rules
    tp = qmodel["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["tensorParallelSize"]
    assert tp["x-kubernetes-int-or-string"] is True and tp["default"] == "auto"


def test_crd_files_parse_as_yaml():
    for kind in KINDS:
        assert yaml.safe_load(path_for(kind).read_text())["kind"] == "CustomResourceDefinition"
