"""The serving engines the operator deploys, one rule set per engine version.

``DEFAULT`` names the version each backend's default image runs (the operator's settings
and the chart use the same versions). ``engine(backend, version)`` finds a rule set, or
raises ``UnknownEngineVersion`` naming the versions this release knows.
"""

from __future__ import annotations

from gptq_compat.engines.builtin import BUILTIN
from gptq_compat.engines.lmdeploy import LMDEPLOY_0_18
from gptq_compat.engines.vllm import VLLM_0_32
from gptq_compat.rules import Engine, Kernel

ENGINES: tuple[Engine, ...] = (VLLM_0_32, LMDEPLOY_0_18, BUILTIN)
DEFAULT: dict[str, Engine] = {e.backend: e for e in (VLLM_0_32, LMDEPLOY_0_18, BUILTIN)}
DEFAULT_IMAGES = {
    "vllm": f"vllm/vllm-openai:v{VLLM_0_32.version}",
    "lmdeploy": f"openmmlab/lmdeploy:v{LMDEPLOY_0_18.version}",
}


class UnknownEngineVersion(ValueError):
    """No rule set describes this engine version."""


def engine(backend: str, version: str | None = None) -> Engine:
    if version is None or backend == "builtin":
        return DEFAULT[backend]
    for e in ENGINES:
        if e.backend == backend and e.version == version.lstrip("v"):
            return e
    known = ", ".join(e.version for e in ENGINES if e.backend == backend)
    raise UnknownEngineVersion(
        f"the operator has no serving rules for {backend} {version}; it knows {known}: "
        f"use an image of a known version or upgrade the operator"
    )


def default_kernels() -> tuple[Kernel, ...]:
    return tuple(k for e in DEFAULT.values() for k in e.kernels)
