"""The gptq.dev/v1alpha1 API: QuantizationJob and QuantizedModel, as pydantic models.

These models are the single source of truth: ``crds/*.yaml`` is generated from them
(``python -m gptq_operator.crd``) and handlers parse ``spec`` into them. Field names are
camelCase on the wire. The worker's settings (``quantization``, ``calibration``) are the
worker's own models, embedded, not redefined. Cross-field rules that the API server must
enforce are CEL expressions in ``x-kubernetes-validations``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from gptq_compat.config import CalibrationConfig, QuantizeConfig

GROUP = "gptq.dev"
VERSION = "v1alpha1"

# hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path
MODEL_URI = r"^(hf://[^/@\s]+/[^@\s]+(@\S+)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?)$"
OUTPUT_URI = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|hf://[^/@\s]+/[^@\s]+)$"


def _rules(*rules: tuple[str, str]) -> dict:
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretReference(_Model):
    """A Secret in the resource's namespace (tokens and keys are never inline)."""

    name: Annotated[str, Field(min_length=1, max_length=253)]


class ModelSource(_Model):
    uri: Annotated[
        str,
        Field(
            pattern=MODEL_URI,
            description=("hf://org/name[@revision], s3://bucket/prefix or pvc://claim/path"),
        ),
    ]
    secret_ref: SecretReference | None = Field(
        None, description="Secret with HF_TOKEN or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )


class OutputSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "!self.uri.startsWith('hf://') || has(self.secretRef)",
                "publishing to hf:// needs secretRef with a write token",
            ),
        )
    )

    uri: Annotated[
        str,
        Field(
            pattern=OUTPUT_URI,
            description=(
                "where the checkpoint goes: s3://bucket/prefix, pvc://claim/path or hf://org/name"
            ),
        ),
    ]
    secret_ref: SecretReference | None = None


Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]


class Resources(_Model):
    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    cpu: Quantity | None = None
    memory: Quantity | None = None


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Scheduling(_Model):
    """Which nodes may run the pod: by the serving engine the result is for, or by SM.

    Engine and kernel names are not part of the schema: which GPUs an engine's kernels run
    on depends on the engine's version, so the operator checks them at reconcile against
    the serving rules it ships (docs/serving-compatibility.md).
    """

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "[has(self.servingBackend), has(self.targetKernel), "
                "has(self.minComputeCapability)].filter(x, x).size() <= 1",
                "set at most one of servingBackend, targetKernel and minComputeCapability",
            ),
        )
    )

    serving_backend: Literal["vllm", "lmdeploy", "builtin"] | None = Field(
        None,
        description="schedule on nodes whose GPUs some kernel of this serving engine supports",
    )
    target_kernel: (
        Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*/[a-z][a-z0-9_-]*$", max_length=63)] | None
    ) = Field(
        None,
        description="schedule on nodes whose GPUs can run this serving kernel, written "
        "'backend/kernel' (e.g. 'vllm/marlin'); checked at reconcile against the "
        "serving rules the operator ships",
    )
    min_compute_capability: Annotated[str, Field(pattern=r"^[1-9][0-9]?\.[0-9]$")] | None = Field(
        None, description="explicit minimum SM, e.g. '8.0'"
    )
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None


Remediation = Literal["descAct", "mseScales", "smallerGroup", "eightBit"]


class QualityGate(_Model):
    """Perplexity after quantization must stay within these bounds, else remediate or fail."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.maxPerplexityIncrease) || has(self.maxPerplexityIncreasePercent)",
                "set maxPerplexityIncrease (absolute) or maxPerplexityIncreasePercent (relative)",
            ),
        )
    )

    max_perplexity_increase: Annotated[float, Field(gt=0)] | None = None
    max_perplexity_increase_percent: Annotated[float, Field(gt=0, le=1000)] | None = None
    eval_dataset: str | None = Field(None, description="text to score; default: calibration")
    remediation: list[Remediation] | None = Field(
        None,
        max_length=4,
        description=(
            "retry ladder when the gate fails, in order: descAct (act-order; already on "
            "by default), mseScales (scale grid search, slower), smallerGroup (halve group "
            "size), eightBit"
        ),
    )


class ImageOverrides(_Model):
    worker: str | None = None
    pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None


class QuantizationJobSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.calibration.dataset)",
                "calibration.dataset is required: a Hugging Face dataset name or an s3:// or "
                "pvc:// URI",
            ),
            ("self.model.uri != self.output.uri", "output.uri must differ from model.uri"),
        )
    )

    model: ModelSource
    quantization: QuantizeConfig = Field(default_factory=QuantizeConfig)
    calibration: CalibrationConfig
    output: OutputSpec
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    quality_gate: QualityGate | None = None
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = 2
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = None
    image: ImageOverrides | None = None


class Condition(_Model):
    """A Kubernetes-style condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: datetime
    observed_generation: int | None = None


class Progress(_Model):
    layer: int = 0
    layers: int = 0
    eta_seconds: float | None = None
    message: str | None = Field(None, description="e.g. 'layer 12/32'")


class ModuleShape(_Model):
    """One distinct shape among a checkpoint's quantized modules, named by its last part."""

    name: str = Field(description="module name's last part, e.g. q_proj or down_proj")
    in_features: int
    out_features: int


class CheckpointSummary(_Model):
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    shapes: list[ModuleShape] | None = Field(
        None,
        description="distinct module shapes, for the serving rules' per-shard checks "
        "under tensor parallelism",
    )


class Attempt(_Model):
    attempt: int
    settings: str = Field(description="what this attempt changed, e.g. 'descAct'")
    outcome: Literal["Running", "Succeeded", "Failed", "QualityGateFailed"]
    perplexity_after: float | None = None
    message: str | None = None


class QuantizationResult(_Model):
    output_uri: str
    format: CheckpointSummary | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kernels: list[str] | None = None
    checkpoint_bytes: int | None = None


JobPhase = Literal["Pending", "Unschedulable", "Running", "Evaluating", "Succeeded", "Failed"]


class QuantizationJobStatus(_Model):
    model_config = ConfigDict(extra="ignore")

    phase: JobPhase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    progress: Progress | None = None
    attempts: list[Attempt] | None = None
    result: QuantizationResult | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None


class ModelReference(_Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.job) != has(self.uri)",
                "source needs exactly one of job (a QuantizationJob name) or uri (a checkpoint)",
            ),
        )
    )

    job: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    uri: Annotated[str, Field(pattern=MODEL_URI)] | None = None
    secret_ref: SecretReference | None = None


class ServingImages(_Model):
    vllm: str | None = None
    lmdeploy: str | None = None
    builtin: str | None = None


class QuantizedModelSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "type(self.tensorParallelSize) == string ? self.tensorParallelSize == 'auto' "
                ": self.tensorParallelSize >= 1",
                "tensorParallelSize is 'auto' or a positive integer",
            ),
        )
    )

    source: ModelReference
    backend: Literal["auto", "vllm", "lmdeploy", "builtin"] = "auto"
    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    resources: Resources = Field(default_factory=Resources)
    tensor_parallel_size: int | str = Field(
        "auto", json_schema_extra={"x-kubernetes-int-or-string": True}
    )
    engine_args: list[str] | None = Field(None, description="extra serving engine flags")
    scheduling: Scheduling = Field(default_factory=Scheduling)
    image: ServingImages | None = None


ModelPhase = Literal["Pending", "Waiting", "Deploying", "Ready", "Degraded", "Failed"]


class QuantizedModelStatus(_Model):
    model_config = ConfigDict(extra="ignore")

    phase: ModelPhase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = None
    backend: str | None = None
    kernel: str | None = None
    endpoint: str | None = None
