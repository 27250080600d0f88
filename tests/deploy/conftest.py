"""Fixtures for the install paths: the real helm binary and chart rendering."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gptq-operator"


@pytest.fixture(scope="session")
def helm() -> str:
    """helm v3, built from the Go module proxy with the control plane's binaries."""
    from tests.controlplane.cluster import ControlPlaneUnavailable, ensure_binaries

    try:
        return str(ensure_binaries(build=True) / "helm")
    except ControlPlaneUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the chart tests must run in CI: {err}")
        pytest.skip(str(err))


class Render:
    """``helm template`` of the chart with ``--set`` pairs, parsed into objects."""

    def __init__(self, helm: str) -> None:
        self.helm = helm

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.helm, *args], capture_output=True, text=True, check=check, timeout=120
        )

    def __call__(self, *sets: str, namespace: str = "gptq-system", **kw) -> list[dict]:
        flags = [f for s in sets for f in ("--set", s)]
        out = self.run(
            "template", "gptq-operator", str(CHART), "--namespace", namespace, *flags, **kw
        )
        return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def render(helm) -> Render:
    return Render(helm)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]
