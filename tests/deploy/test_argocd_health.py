"""Argo CD health checks (Lua) for both kinds, run with Lua itself on Argo CD's test cases.

Argo CD runs ``health.lua`` with the object as the global ``obj`` and expects a table with
``status`` and ``message``; ``health_test.yaml`` lists inputs and expected results in Argo
CD's own resource_customizations format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="lupa (Lua for Python) comes with the dev extra")

CUSTOMIZATIONS = (
    Path(__file__).resolve().parents[2] / "gitops" / "argocd" / "resource_customizations"
)
KINDS = sorted(p.parent for p in CUSTOMIZATIONS.glob("gptq.dev/*/health.lua"))
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def health(kind_dir: Path, obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute((kind_dir / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def _to_lua(lua, value):
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


CASES = [
    pytest.param(kind, case, id=f"{kind.name}-{Path(case['inputPath']).stem}")
    for kind in KINDS
    for case in yaml.safe_load((kind / "health_test.yaml").read_text())["tests"]
]


def test_both_kinds_have_checks():
    assert [k.name for k in KINDS] == ["QuantizationJob", "QuantizedModel"]


@pytest.mark.parametrize(("kind", "case"), CASES)
def test_health_matches_argo_cd_test_case(kind, case):
    obj = yaml.safe_load((kind / case["inputPath"]).read_text())
    got = health(kind, obj)
    assert got == case["healthStatus"]
    assert got["status"] in STATUSES


def test_every_status_a_kind_can_report_is_covered():
    for kind in KINDS:
        expected = {c["healthStatus"]["status"] for c in yaml.safe_load(
            (kind / "health_test.yaml").read_text())["tests"]}  # fmt: skip
        assert {"Healthy", "Progressing", "Degraded"} <= expected, kind.name
