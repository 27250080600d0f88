"""The worker's host-memory check (worker/gptq_worker/memory.py) against the sizing formula."""

from __future__ import annotations

import pytest

from gptq_compat.sizing import GIB, expected_peak_bytes
from gptq_worker.memory import MemoryTooSmall, check_fits, memory_limit, weights_bytes


@pytest.mark.parametrize(
    ("text", "limit"),
    [("max", None), ("4294967296", 4 * GIB), ("9223372036854771712", None), ("junk", None)],
)
def test_reads_the_cgroup_limit(tmp_path, text, limit):
    (tmp_path / "memory.max").write_text(text + "\n")
    assert memory_limit((str(tmp_path / "memory.max"),)) == limit


def test_falls_back_to_cgroup_v1_and_to_no_limit(tmp_path):
    v1 = tmp_path / "memory.limit_in_bytes"
    v1.write_text("8589934592\n")
    assert memory_limit((str(tmp_path / "missing"), str(v1))) == 8 * GIB
    assert memory_limit((str(tmp_path / "missing"),)) is None


def test_a_limit_below_the_expected_peak_names_the_setting_and_the_number():
    size = 16_060_000_000  # an 8B model in fp16
    with pytest.raises(MemoryTooSmall) as err:
        check_fits(size, 4 * GIB)
    text = str(err.value)
    assert "4.0 GiB" in text and "spec.resources.memory" in text and "10Gi" in text
    check_fits(size, expected_peak_bytes(size))  # at the peak: fits
    check_fits(size, None)  # no limit: nothing to check


def test_weights_bytes_counts_safetensors_of_a_local_directory(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "config.json").write_text("{}")
    assert weights_bytes(tmp_path) == 15
    assert weights_bytes("meta-llama/Llama-3.1-8B") is None  # a Hub id: not measured here
