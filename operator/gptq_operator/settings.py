"""The operator's settings: read once from the environment (prefix ``GPTQ_``) at startup."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field

from gptq_compat.engines import DEFAULT_IMAGES


def repository(image: str) -> str:
    """``registry/path/name`` of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


class LabelKeys(BaseModel):
    """Node labels that describe GPUs (NVIDIA GPU Feature Discovery's by default)."""

    compute_major: str = "nvidia.com/gpu.compute.major"
    compute_minor: str = "nvidia.com/gpu.compute.minor"
    product: str = "nvidia.com/gpu.product"
    memory: str = "nvidia.com/gpu.memory"
    count: str = "nvidia.com/gpu.count"


class OperatorSettings(BaseModel):
    worker_image: str = "ghcr.io/gptq-operator/worker:0.1.0"
    # the device a worker that asked for GPUs is told to use: cuda (fail if the pod sees
    # none), or auto (CUDA when the pod sees it, else the CPU: clusters that advertise
    # nvidia.com/gpu without GPUs behind it, such as development and test clusters)
    worker_gpu_device: Literal["cuda", "auto"] = "cuda"
    gpu_resource: str = "nvidia.com/gpu"
    labels: LabelKeys = Field(default_factory=LabelKeys)
    # Tolerations added to every GPU pod, for clusters that taint GPU nodes.
    gpu_tolerations: list[dict] = Field(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    )
    # serving images per backend (the builtin backend defaults to the worker image)
    image_vllm: str = DEFAULT_IMAGES["vllm"]
    image_lmdeploy: str = DEFAULT_IMAGES["lmdeploy"]
    image_builtin: str | None = None
    # what a spec may name (policy.py): image repositories ("*": any; a trailing "/": any
    # image under that path; empty: the default images' repositories) and Secret names
    allowed_images: list[str] = Field(default_factory=list)
    allowed_secrets: list[str] = Field(default_factory=lambda: ["hf-token", "gptq-*"])
    run_as_user: int = 10001
    scratch_size: str = "20Gi"
    metrics_port: int = 8080  # 0: no metrics endpoint

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        labels = LabelKeys(
            **{
                field: env[f"GPTQ_LABEL_{field.upper()}"]
                for field in LabelKeys.model_fields
                if f"GPTQ_LABEL_{field.upper()}" in env
            }
        )
        values = {
            field: env[f"GPTQ_{field.upper()}"]
            for field in (
                "worker_image",
                "worker_gpu_device",
                "gpu_resource",
                "scratch_size",
                "metrics_port",
                "image_vllm",
                "image_lmdeploy",
                "image_builtin",
            )
            if f"GPTQ_{field.upper()}" in env
        }
        lists = {
            field: [
                item.strip() for item in env[f"GPTQ_{field.upper()}"].split(",") if item.strip()
            ]
            for field in ("allowed_images", "allowed_secrets")
            if f"GPTQ_{field.upper()}" in env
        }
        return cls(labels=labels, **lists, **{k: v for k, v in values.items() if v != ""})

    def serving_image(self, backend: str) -> str:
        """The default image of a serving backend (a QuantizedModel's spec.image overrides)."""
        image = {"vllm": self.image_vllm, "lmdeploy": self.image_lmdeploy}.get(backend)
        return image or self.image_builtin or self.worker_image

    def allowed_image_repositories(self) -> list[str]:
        """The image repositories a spec may name (``allowed_images``, or by default the
        repositories of the default images)."""
        if self.allowed_images:
            return list(self.allowed_images)
        defaults = (self.image_vllm, self.image_lmdeploy, self.image_builtin, self.worker_image)
        return sorted({repository(i) for i in defaults if i})
