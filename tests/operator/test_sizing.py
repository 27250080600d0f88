"""The worker's memory request from the model's size (compat/gptq_compat/sizing.py)."""

from __future__ import annotations

import pytest

from gptq_compat.sizing import GIB, expected_peak_bytes, worker_memory, worker_memory_bytes

MEASURED = {  # model bytes -> the highest peak RSS seen, bench/results/speed-e2e-*-h200-*.txt
    16_060_000_000: 7.50 * GIB,  # Llama-3-8B shape (2026-12-01; 7.47 on 2026-12-02)
    141_100_000_000: 13.18 * GIB,  # Llama-3-70B shape, flat in the layer count (2026-12-02)
}


@pytest.mark.parametrize("model_bytes", sorted(MEASURED))
def test_request_covers_the_measured_peak_with_headroom(model_bytes):
    request = worker_memory_bytes(model_bytes)
    assert request >= 1.2 * MEASURED[model_bytes]
    assert request <= 1.6 * MEASURED[model_bytes]  # and does not ask for far more


def test_documented_values_and_whole_gibibytes():
    assert worker_memory(16_060_000_000) == "10Gi"
    assert worker_memory(141_100_000_000) == "17Gi"
    assert worker_memory(0) == "9Gi"
    for size in (1, 10**9, 5 * 10**10, 4 * 10**11):
        assert worker_memory_bytes(size) % GIB == 0


def test_grows_with_the_model_and_rejects_negative_sizes():
    sizes = [0, 10**9, 10**10, 10**11, 10**12]
    requests = [worker_memory_bytes(s) for s in sizes]
    assert requests == sorted(requests) and requests[0] < requests[-1]
    with pytest.raises(ValueError, match="negative"):
        worker_memory_bytes(-1)


@pytest.mark.parametrize("model_bytes", sorted(MEASURED))
def test_the_expected_peak_is_not_below_a_measured_one(model_bytes):
    # the worker refuses a memory limit below this line: it must not refuse one that fits
    peak = expected_peak_bytes(model_bytes)
    assert MEASURED[model_bytes] <= peak <= 1.05 * MEASURED[model_bytes]
