"""Host memory: the model's size on disk, the container's limit, and whether the run fits.

The formula is :mod:`gptq_compat.sizing`'s, which the operator also uses for the worker
pod's memory request. A worker whose limit is below the expected peak would be killed by
the kernel's OOM killer partway through (exit 137, no message); it stops before the first
layer instead, with the number to set.
"""

from __future__ import annotations

from pathlib import Path

from gptq_compat.sizing import GIB, expected_peak_bytes, worker_memory

# cgroup v2 first, then v1; a limit at or above this is "no limit" (v1 writes 2^63 rounded
# down to the page size)
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
UNLIMITED = 2**60


class MemoryTooSmall(ValueError):
    """The container's memory limit is below what quantizing this model takes."""


def weights_bytes(model: str | Path) -> int | None:
    """Bytes of a local model directory's safetensors files; None where the model is not
    a local directory (a Hub id is measured only once downloaded)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def memory_limit(files: tuple[str, ...] = CGROUP_LIMIT_FILES) -> int | None:
    """This process's cgroup memory limit in bytes, or None where there is none."""
    for name in files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= UNLIMITED else value
    return None


def check_fits(model_bytes: int, limit: int | None) -> None:
    """Raise :class:`MemoryTooSmall` when ``limit`` is below the expected peak RSS of a
    GPU run streaming a model of ``model_bytes``."""
    if limit is None:
        return
    peak = expected_peak_bytes(model_bytes)
    if limit < peak:
        raise MemoryTooSmall(
            f"the worker's memory limit is {limit / GIB:.1f} GiB, but quantizing this model "
            f"({model_bytes / 1e9:.1f} GB of weights) on a GPU takes about {peak / GIB:.1f} "
            f"GiB of host memory at its peak; set the QuantizationJob's "
            f"spec.resources.memory to at least {worker_memory(model_bytes)} (or leave it "
            "out: the operator then requests that much and sets no limit)"
        )
