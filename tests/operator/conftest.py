"""Operator fixtures on the real control plane: CRDs, namespaces, PVCs, a running operator."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kopf.testing import KopfRunner


@pytest.fixture
def operator(control_plane, api, monkeypatch):
    """The operator, running in this process against the control plane; yields its
    metrics URL."""
    from tests.controlplane.cluster import _free_port

    port, health = _free_port(), _free_port()
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_path()))
    monkeypatch.setenv("GPTQ_METRICS_PORT", str(port))
    args = [
        "run",
        "--all-namespaces",
        "--standalone",
        "-m",
        "gptq_operator.handlers",
        f"--liveness=http://127.0.0.1:{health}/healthz",
    ]
    with KopfRunner(args, timeout=60) as runner:
        yield OperatorEndpoints(
            f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{health}/healthz"
        )
    assert runner.exception is None, runner.output


@dataclass(frozen=True)
class OperatorEndpoints:
    metrics: str
    liveness: str


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of a Prometheus endpoint, parsed by prometheus-client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
