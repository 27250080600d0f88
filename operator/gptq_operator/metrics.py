"""The operator's Prometheus metrics: defined here, registered when the operator starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "gptq_operator_reconciles_total",
            "Reconciles by kind and result (ok, retry, failed, error).",
            ["kind", "result"],
            registry=registry,
        )
        self.reconcile_seconds = Histogram(
            "gptq_operator_reconcile_duration_seconds",
            "Time spent in one reconcile.",
            ["kind"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = Gauge(
            "gptq_operator_quantization_jobs",
            "QuantizationJobs by phase.",
            ["phase"],
            registry=registry,
        )
        self.models = Gauge(
            "gptq_operator_quantized_models",
            "QuantizedModels by phase.",
            ["phase"],
            registry=registry,
        )
        self.time_to_ready = Histogram(
            "gptq_operator_model_time_to_ready_seconds",
            "From a QuantizedModel's creation to its first Ready.",
            registry=registry,
            buckets=(10, 30, 60, 120, 300, 600, 1200, 3600, 7200, 14400),
        )
        self._phases: dict[str, str] = {}
        self._model_phases: dict[str, str] = {}
        self._ready: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Time a reconcile and count its result; kopf's retry errors count as 'retry'."""
        started = time.monotonic()
        result = "ok"
        try:
            yield
        except Exception as err:
            name = type(err).__name__
            result = {"TemporaryError": "retry", "PermanentError": "failed"}.get(name, "error")
            raise
        finally:
            self.reconciles.labels(kind, result).inc()
            self.reconcile_seconds.labels(kind).observe(time.monotonic() - started)

    def model_phase(self, uid: str, phase: str | None, age_seconds: float | None = None) -> None:
        """Track one QuantizedModel's phase (None: deleted) and refresh the counts.

        Time to ready is observed when this process sees a model turn Ready from another
        phase, once per model: a model already Ready when the operator starts (or restarts)
        was counted before, or its time is unknown."""
        with self._lock:
            before = self._model_phases.get(uid)
            if (
                phase == "Ready"
                and before not in (None, "Ready")
                and uid not in self._ready
                and age_seconds is not None
            ):
                self._ready.add(uid)
                self.time_to_ready.observe(age_seconds)
            known = ("Pending", "Waiting", "Deploying", "Ready", "Degraded", "Failed")
            _track(self.models, self._model_phases, uid, phase, known)

    def job_phase(self, uid: str, phase: str | None) -> None:
        """Track one QuantizationJob's phase (None: deleted) and refresh the counts."""
        known = ("Pending", "Unschedulable", "Running", "Succeeded", "Failed")
        _track(self.jobs, self._phases, uid, phase, known)


def _track(
    gauge: Gauge, phases: dict[str, str], uid: str, phase: str | None, known: tuple[str, ...]
) -> None:
    if phase is None:
        phases.pop(uid, None)
    else:
        phases[uid] = phase
    for name in {*known, *phases.values()}:
        gauge.labels(name).set(sum(1 for p in phases.values() if p == name))


def serve(port: int) -> Metrics:
    """Create the metrics and expose them on ``port`` (0: not exposed)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    if port:
        start_http_server(port, registry=registry)
    return metrics
