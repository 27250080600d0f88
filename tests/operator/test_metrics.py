"""The operator's metrics bookkeeping (registered on a private registry, as at startup)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from gptq_operator.metrics import Metrics


def test_time_to_ready_counts_each_model_once_when_seen_turning_ready():
    m = Metrics(CollectorRegistry())
    m.model_phase("uid-a", "Deploying", 30.0)
    m.model_phase("uid-a", "Ready", 42.0)
    m.model_phase("uid-a", "Ready", 43.0)  # seen again: not counted twice
    m.model_phase("uid-a", "Deploying", 50.0)
    m.model_phase("uid-a", "Ready", 60.0)  # ready again after a rollout: its first time counts
    m.model_phase("uid-b", "Waiting", 1.0)
    m.model_phase("uid-b", "Ready", 7.0)
    m.model_phase("uid-c", "Ready", 900.0)  # Ready when first seen (operator restart): unknown
    get = m.registry.get_sample_value
    assert get("gptq_operator_model_time_to_ready_seconds_count") == 2
    assert get("gptq_operator_model_time_to_ready_seconds_sum") == 49.0


def test_jobs_by_phase_follow_transitions_and_deletions():
    m = Metrics(CollectorRegistry())
    m.job_phase("a", "Pending")
    m.job_phase("b", "Running")
    m.job_phase("a", "Running")
    m.job_phase("b", None)  # deleted
    get = m.registry.get_sample_value
    assert get("gptq_operator_quantization_jobs", {"phase": "Running"}) == 1
    assert get("gptq_operator_quantization_jobs", {"phase": "Pending"}) == 0


def test_models_by_phase_follow_transitions_and_deletions():
    m = Metrics(CollectorRegistry())
    m.model_phase("a", "Waiting")
    m.model_phase("b", "Deploying")
    m.model_phase("a", "Ready")
    m.model_phase("b", None)
    get = m.registry.get_sample_value
    assert get("gptq_operator_quantized_models", {"phase": "Ready"}) == 1
    assert get("gptq_operator_quantized_models", {"phase": "Deploying"}) == 0
    assert get("gptq_operator_quantized_models", {"phase": "Waiting"}) == 0


def test_reconcile_results_are_counted_by_kind():
    m = Metrics(CollectorRegistry())
    with m.reconcile("QuantizationJob"):
        pass
    with pytest.raises(RuntimeError), m.reconcile("QuantizationJob"):
        raise RuntimeError("boom")
    get = m.registry.get_sample_value
    assert get("gptq_operator_reconciles_total", {"kind": "QuantizationJob", "result": "ok"}) == 1
    assert (
        get("gptq_operator_reconciles_total", {"kind": "QuantizationJob", "result": "error"}) == 1
    )
