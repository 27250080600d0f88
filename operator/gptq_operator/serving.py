"""Serving a checkpoint: pick backend, kernel and tensor parallelism.

Pure functions; ``models.py`` applies them (and ``workload.py`` builds the Deployment and
Service for the choice). The choice applies the serving rules of the
engine version each backend's image runs (docs/serving-compatibility.md) to the checkpoint's
settings and the distinct module shapes the worker reported, per tensor-parallel shard, and
keeps the kernels whose compute-capability range some node in the cluster offers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gptq_compat.config import CheckpointFormat, ModuleSettings
from gptq_compat.engines import DEFAULT_IMAGES, UnknownEngineVersion, engine
from gptq_compat.rules import Engine, QuantizedModule, judge, sm_text
from gptq_operator.api import CheckpointSummary
from gptq_operator.scheduling import SM, sm_in_range

# Preference when the backend is "auto": fastest kernels first. vLLM's CPU kernel is not
# here: the operator deploys vLLM's CUDA image.
PREFERENCE = (
    "vllm/machete",
    "vllm/marlin",
    "lmdeploy/turbomind",
    "vllm/exllama",
    "vllm/triton_w4a16",
    "builtin/torch",
)


class Incompatible(ValueError):
    """The checkpoint, the requested backend and the cluster's GPUs do not fit together."""


@dataclass(frozen=True)
class Choice:
    backend: str
    kernel: str
    min_sm: SM | None
    max_sm: SM | None
    engine: str = ""  # "vLLM 0.32.0": the rule set the choice was made with


def image_version(image: str) -> str | None:
    """The release an image tag names (``vllm/vllm-openai:v0.32.0`` -> ``0.32.0``)."""
    tag = image.rsplit("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    m = re.match(r"^v?(\d+\.\d+\.\d+)", tag)
    return m.group(1) if m else None


def serving_engine(backend: str, image: str) -> Engine:
    """The rule set for the engine version ``image`` runs; UnknownEngineVersion if none."""
    if backend == "builtin":
        return engine(backend)
    version = image_version(image)
    if version is None:
        raise UnknownEngineVersion(
            f"cannot tell which {backend} version image {image!r} runs: tag it with a "
            f"release (e.g. {DEFAULT_IMAGES[backend]})"
        )
    return engine(backend, version)


def checkpoint_modules(fmt: CheckpointSummary) -> list[QuantizedModule]:
    """The checkpoint's quantized modules as the rules see them: one per distinct shape the
    worker reported, or one that only carries the settings when shapes are unknown."""
    settings = ModuleSettings(
        bits=fmt.bits, group_size=fmt.group_size, sym=fmt.sym, desc_act=fmt.desc_act
    )
    if not fmt.shapes:
        return [QuantizedModule("checkpoint", 4096, 4096, settings)]
    return [QuantizedModule(s.name, s.in_features, s.out_features, settings) for s in fmt.shapes]


def choose(
    backend: str,
    fmt: CheckpointSummary,
    engines: dict[str, Engine | UnknownEngineVersion],
    node_sms: list[SM],
    tp: int,
) -> Choice:
    """The best kernel of ``backend`` that loads the checkpoint at tensor parallel ``tp``
    and that some node can run. ``engines`` holds the rule set of each backend's image."""
    candidates = [k for k in PREFERENCE if backend in ("auto", k.split("/")[0])]
    modules = checkpoint_modules(fmt)
    problems = []
    for name in candidates:
        rules = engines[name.split("/")[0]]
        if isinstance(rules, UnknownEngineVersion):
            problems.append(f"{name}: {rules}")
            continue
        kernel = rules.kernel(name)
        verdict = next(
            v
            for v in judge(rules, modules, CheckpointFormat(fmt.checkpoint_format), tp)
            if v.kernel.name == name
        )
        if not verdict.loads:
            problems.append(f"{name}: {'; '.join(verdict.reasons)}")
            continue
        if kernel.min_sm and not any(
            sm_in_range(sm, kernel.min_sm, kernel.max_sm) for sm in node_sms
        ):
            problems.append(f"{name}: no node has a GPU with {sm_text(kernel)} ({rules.label})")
            continue
        return Choice(rules.backend, name, kernel.min_sm, kernel.max_sm, rules.label)
    raise Incompatible(
        f"backend {backend} cannot serve this checkpoint here: " + " | ".join(problems)
    )


def tensor_parallel(
    requested: int | str,
    checkpoint_bytes: int | None,
    gpu_memory_mib: list[int],
    headroom: float = 0.6,
) -> int:
    """``auto``: the smallest power of two whose shards fit in ``headroom`` of the smallest
    eligible GPU's memory (the rest is for the KV cache and activations)."""
    if requested != "auto":
        return int(requested)
    if not checkpoint_bytes or not gpu_memory_mib:
        return 1
    per_gpu = min(gpu_memory_mib) * 2**20 * headroom
    return 2 ** max(0, math.ceil(math.log2(checkpoint_bytes / per_gpu)))
