"""The gptq.dev/v1alpha1 API: QuantizationJob and QuantizedModel, as pydantic models.

These models are the single source of truth: ``crds/*.yaml`` is generated from them
(``python -m gptq_operator.crd``) and handlers parse ``spec`` into them. Field names are
camelCase on the wire. The worker's settings (``quantization``, ``calibration``) are the
worker's own models, embedded, not redefined. Cross-field rules that the API server must
enforce are CEL expressions in ``x-kubernetes-validations``, with messages in words.

This module is longer than most because every field carries its description: the text
``kubectl explain`` shows (tests/operator/test_crd_docs.py asserts none is missing).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from gptq_compat.config import CalibrationConfig, QuantizeConfig

GROUP = "gptq.dev"
VERSION = "v1alpha1"

# hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path
MODEL_URI = r"^(hf://[^/@\s]+/[^@\s]+(@\S+)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?)$"
OUTPUT_URI = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|hf://[^/@\s]+/[^@\s]+)$"


def _rules(*rules: tuple[str, str]) -> dict:
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


def _matching(pattern: str, message: str, *rules: tuple[str, str], **field: Any) -> Any:
    """A string that must match ``pattern``. Pydantic checks the pattern; the CRD checks it
    with a CEL rule that answers ``message`` (after any other ``rules``), because the API
    server would quote a schema ``pattern`` back raw, and report it first."""

    def schema(node: dict) -> None:
        del node["pattern"]
        node.update(_rules(*rules, (f"self.matches(r'{pattern}')", message)))

    return Annotated[str, Field(pattern=pattern, json_schema_extra=schema, **field)]


def _uri(pattern: str, field: str, forms: str) -> Any:
    return _matching(
        pattern,
        f"{field} must be {forms}",
        (
            "!self.matches(r'^[a-z0-9]+://[^/]*@')",
            f"{field} must not hold credentials (user:password@); put them in a Secret "
            f"and name it in {field.rsplit('.', 1)[0]}.secretRef",
        ),
    )


MODEL_FORMS = "hf://org/name[@revision], s3://bucket/prefix or pvc://claim/path"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretReference(_Model):
    """A Secret in the resource's namespace (tokens and keys are never inline)."""

    name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="name of the Secret, in the same namespace as this resource"
    )


class SecretKeyReference(_Model):
    """One key of a Secret in the resource's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="name of the Secret, in the same namespace as this resource"
    )
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        "api-key", description="the key in the Secret's data; default api-key"
    )


class ModelSource(_Model):
    """The full-precision model to quantize."""

    uri: _uri(MODEL_URI, "model.uri", MODEL_FORMS) = Field(
        description="where the model is: hf://org/name[@revision] (Hugging Face Hub, "
        "optionally at a branch, tag or commit), s3://bucket/prefix or pvc://claim/path, "
        "e.g. hf://meta-llama/Llama-3.1-8B-Instruct"
    )
    secret_ref: SecretReference | None = Field(
        None,
        description="Secret with HF_TOKEN (hf://) or AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (s3://); leave out for public models and pvc://",
    )


class OutputSpec(_Model):
    """Where the quantized checkpoint is written."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "!self.uri.startsWith('hf://') || has(self.secretRef)",
                "publishing to hf:// needs secretRef with a write token",
            ),
        )
    )

    uri: _uri(OUTPUT_URI, "output.uri", "s3://bucket/prefix, pvc://claim/path or hf://org/name") = (
        Field(
            description="where the checkpoint goes: s3://bucket/prefix, pvc://claim/path or "
            "hf://org/name (published to the Hub), e.g. pvc://models/llama-3.1-8b-w4g128"
        )
    )
    secret_ref: SecretReference | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (s3://) or an "
        "HF_TOKEN that may write (hf://, required there)",
    )
    overwrite: bool = Field(
        False,
        description="replace a checkpoint that already exists at uri (default false: the job "
        "fails with OutputExists and the files stay as they are)",
    )


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class Resources(_Model):
    """What each pod gets: GPUs as a limit, CPU as a request, memory as request and limit."""

    gpus: Annotated[int, Field(ge=0, le=16)] = Field(
        1, description="GPUs per pod (0 to 16, default 1); for serving, per replica"
    )
    cpu: _matching(QUANTITY, "cpu must be a quantity of CPUs such as 8, 0.5 or 500m") | None = (
        Field(None, description="CPU cores, e.g. 8 or 500m; default: none requested")
    )
    memory: (
        _matching(QUANTITY, "memory must be a quantity of bytes such as 64Gi, 512Mi or 1.5G") | None
    ) = Field(
        None,
        description="memory in bytes with a unit, e.g. 16Gi or 512Mi, as request and limit; "
        "default: a GPU worker requests what the sizing formula gives for the model (no "
        "limit), a serving pod none",
    )


class Toleration(_Model):
    """Lets the pod run on nodes with a matching taint (as in a Pod's tolerations)."""

    key: str | None = Field(
        None, description="taint key to tolerate, e.g. nvidia.com/gpu; empty with Exists: all"
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Equal (the default): key and value match; Exists: any value"
    )
    value: str | None = Field(None, description="taint value to match with operator Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None,
        description="taint effect to tolerate: NoSchedule, PreferNoSchedule or NoExecute; "
        "empty: all",
    )
    toleration_seconds: int | None = Field(
        None,
        description="with NoExecute: seconds the pod stays after the taint appears; empty: forever",
    )


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
        _matching(
            r"^[a-z][a-z0-9_-]*/[a-z][a-z0-9_-]*$",
            "targetKernel must be 'backend/kernel' in lower case, e.g. 'vllm/marlin'",
            max_length=63,
        )
        | None
    ) = Field(
        None,
        description="schedule on nodes whose GPUs can run this serving kernel, written "
        "'backend/kernel' (e.g. 'vllm/marlin'); checked at reconcile against the "
        "serving rules the operator ships",
    )
    min_compute_capability: (
        _matching(
            r"^[1-9][0-9]?\.[0-9]$",
            "minComputeCapability must be a GPU compute capability major.minor, e.g. '8.0' "
            "or '9.0'",
        )
        | None
    ) = Field(None, description="explicit minimum SM (CUDA compute capability), e.g. '8.0'")
    node_selector: dict[str, str] | None = Field(
        None,
        description="node labels the pod's node must have, as in a Pod's nodeSelector, "
        "e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
    )
    tolerations: list[Toleration] | None = Field(
        None, description="taints the pod tolerates, e.g. of dedicated GPU nodes"
    )


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

    max_perplexity_increase: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="largest allowed rise in perplexity, in perplexity points, e.g. 0.5",
    )
    max_perplexity_increase_percent: Annotated[float, Field(gt=0, le=1000)] | None = Field(
        None,
        description="largest allowed rise in perplexity, in percent of the value before "
        "quantization, e.g. 5",
    )
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
    """Container images for this job in place of the operator's defaults."""

    worker: str | None = Field(
        None,
        description="worker image, e.g. ghcr.io/acme/gptq-worker:1.2; default: the "
        "operator's configured worker image",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="image pull policy: Always, IfNotPresent or Never; default: Kubernetes'"
    )


class QuantizationJobSpec(_Model):
    """Quantize a model with GPTQ and write the checkpoint (a QuantizationJob's spec)."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.calibration.dataset)",
                "calibration.dataset is required: a Hugging Face dataset name or an s3:// or "
                "pvc:// URI",
            ),
            ("self.model.uri != self.output.uri", "output.uri must differ from model.uri"),
            (
                "self == oldSelf",
                "spec is immutable: a QuantizationJob runs once; to quantize with other "
                "settings create a new QuantizationJob (or delete and re-create this one)",
            ),
        )
    )

    model: ModelSource = Field(description="the full-precision model to quantize")
    quantization: QuantizeConfig = Field(
        default_factory=QuantizeConfig,
        description="how to quantize: bits, group size, act-order, ...; all have defaults",
    )
    calibration: CalibrationConfig = Field(
        description="the text whose activations GPTQ fits the quantized weights to"
    )
    output: OutputSpec = Field(description="where the quantized checkpoint is written")
    resources: Resources = Field(
        default_factory=Resources, description="GPUs, CPU and memory of the worker pod"
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling, description="which nodes may run the worker"
    )
    quality_gate: QualityGate | None = Field(
        None,
        description="perplexity bounds the result must meet, with retries that trade size "
        "for quality; default: no gate",
    )
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = Field(
        2, description="retries of a failed worker pod per attempt (0 to 10, default 2)"
    )
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = Field(
        None,
        description="seconds a worker Job may run before it is stopped and the attempt "
        "fails (at least 60); default: no limit",
    )
    image: ImageOverrides | None = Field(
        None, description="worker image in place of the operator's default"
    )


class Condition(_Model):
    """A Kubernetes-style condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="what the condition is about: Ready, Reconciling, ...")
    status: Literal["True", "False", "Unknown"] = Field(
        description="whether the condition holds: True, False or Unknown"
    )
    reason: str = Field(description="why, as one CamelCase word, e.g. Running or NoCompatibleNodes")
    message: str = Field("", description="why, in words")
    last_transition_time: datetime = Field(description="when status last changed")
    observed_generation: int | None = Field(
        None, description="the metadata.generation of the spec this condition was set for"
    )


class Progress(_Model):
    """How far the worker is, as it reports it."""

    layer: int = Field(0, description="decoder layers quantized so far")
    layers: int = Field(0, description="decoder layers in the model")
    eta_seconds: float | None = Field(
        None, description="estimated seconds until the worker is done"
    )
    message: str | None = Field(None, description="e.g. 'layer 12/32'")
    model_bytes: int | None = Field(
        None, description="bytes of the model's safetensors weights, as the worker found them"
    )
    worker_memory: str | None = Field(
        None,
        description="host memory the worker needs for this model by the sizing formula, "
        "e.g. 10Gi; attempts after the first request it when resources.memory is unset",
    )


class LastFailure(_Model):
    """The most recent cause that stopped the resource, kept after it is gone."""

    reason: str = Field(
        description="CamelCase cause, e.g. ImagePullBackOff, CrashLoopBackOff, MissingSecret, "
        "PVCNotFound, Unschedulable, WorkerFailed, SourceJobFailed, Incompatible"
    )
    message: str = Field(description="what happened and the fix")
    exit_code: int | None = Field(None, description="the container's exit code, where one ended")
    time: datetime = Field(description="when this cause was first seen")


class ModuleShape(_Model):
    """One distinct shape among a checkpoint's quantized modules, named by its last part."""

    name: str = Field(description="module name's last part, e.g. q_proj or down_proj")
    in_features: int = Field(description="the module's input features (weight columns)")
    out_features: int = Field(description="the module's output features (weight rows)")


class CheckpointSummary(_Model):
    """The quantization format of the written checkpoint, as serving engines see it."""

    bits: int = Field(description="bits per weight, e.g. 4")
    group_size: int = Field(description="columns per scale group; -1: one per output channel")
    desc_act: bool = Field(description="whether act-order was used (g_idx in the checkpoint)")
    sym: bool = Field(description="whether zero points are fixed at the middle (symmetric)")
    checkpoint_format: str = Field(description="gptq (v1) or gptq_v2 zero-point storage")
    shapes: list[ModuleShape] | None = Field(
        None,
        description="distinct module shapes, for the serving rules' per-shard checks "
        "under tensor parallelism",
    )


class Attempt(_Model):
    """One try at quantizing: the first, then one per quality-gate remediation."""

    attempt: int = Field(description="the attempt's number, from 1")
    settings: str = Field(description="what this attempt changed, e.g. 'descAct'")
    outcome: Literal["Running", "Succeeded", "Failed", "QualityGateFailed"] = Field(
        description="Running, Succeeded, Failed or QualityGateFailed"
    )
    perplexity_after: float | None = Field(
        None, description="perplexity of this attempt's checkpoint"
    )
    message: str | None = Field(None, description="why it failed, in words")


class QuantizationResult(_Model):
    """What the finished worker wrote."""

    output_uri: str = Field(description="where the checkpoint was written")
    format: CheckpointSummary | None = Field(
        None, description="the checkpoint's quantization format"
    )
    perplexity_before: float | None = Field(
        None, description="perplexity of the full-precision model on the evaluation text"
    )
    perplexity_after: float | None = Field(
        None, description="perplexity of the quantized model on the same text"
    )
    kernels: list[str] | None = Field(
        None, description="serving kernels that accept this checkpoint, e.g. vllm/marlin"
    )
    checkpoint_bytes: int | None = Field(None, description="size of the checkpoint in bytes")


JobPhase = Literal["Pending", "Unschedulable", "Running", "Evaluating", "Succeeded", "Failed"]

GENERATION = "the metadata.generation of the spec the operator last acted on"
CONDITIONS = (
    "Ready, Reconciling and Stalled (jobs also Schedulable), each with a reason such as "
    "Running or NoCompatibleNodes and a message"
)


class QuantizationJobStatus(_Model):
    """What the operator and the worker report about a QuantizationJob."""

    model_config = ConfigDict(extra="ignore")

    phase: JobPhase | None = Field(
        None,
        description="the job's stage: Pending, Unschedulable (no node can run the worker), "
        "Running, Evaluating, Succeeded or Failed",
    )
    observed_generation: int | None = Field(None, description=GENERATION)
    conditions: list[Condition] | None = Field(None, description=CONDITIONS)
    progress: Progress | None = Field(None, description="how far the running worker is")
    attempts: list[Attempt] | None = Field(
        None, description="every attempt so far, the first and each remediation"
    )
    result: QuantizationResult | None = Field(
        None, description="what the worker wrote, once it succeeded"
    )
    start_time: datetime | None = Field(None, description="when the first worker Job was created")
    completion_time: datetime | None = Field(
        None, description="when the job succeeded or failed for good"
    )
    last_failure: LastFailure | None = Field(
        None, description="the last cause that stopped the worker, with its fix"
    )


SERVE_FROM_PVC = (
    "source.uri: this version serves checkpoints from pvc://claim/path only; copy an hf:// "
    "or s3:// checkpoint to a PersistentVolumeClaim first (or quantize with a "
    "QuantizationJob and use source.job)"
)


class ModelReference(_Model):
    """The checkpoint to serve: a QuantizationJob's output or a URI."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.job) != has(self.uri)",
                "source needs exactly one of job (a QuantizationJob name) or uri (a checkpoint)",
            ),
            (
                "!has(self.uri) || self.uri.startsWith('pvc://')",
                SERVE_FROM_PVC,
            ),
        )
    )

    job: Annotated[str, Field(min_length=1, max_length=253)] | None = Field(
        None,
        description="name of a QuantizationJob in this namespace; serving starts once it "
        "succeeds, from its output",
    )
    uri: _uri(MODEL_URI, "source.uri", MODEL_FORMS) | None = Field(
        None,
        description="a GPTQ checkpoint on a PersistentVolumeClaim: pvc://claim/path, e.g. "
        "pvc://models/llama-3.1-8b-w4g128 (hf:// and s3:// are refused by this version)",
    )
    secret_ref: SecretReference | None = Field(
        None,
        description="reserved for hf:// and s3:// sources, which this version does not "
        "serve from yet",
    )

    @field_validator("uri")
    @classmethod
    def _from_pvc(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("pvc://"):
            raise ValueError(SERVE_FROM_PVC)
        return value


class ServingImages(_Model):
    """Serving images in place of the operator's defaults, per engine."""

    vllm: str | None = Field(
        None, description="image for the vllm backend, e.g. vllm/vllm-openai:v0.8.5"
    )
    lmdeploy: str | None = Field(None, description="image for the lmdeploy backend")
    builtin: str | None = Field(None, description="image for the builtin backend")


class QuantizedModelSpec(_Model):
    """Serve a GPTQ checkpoint behind an OpenAI-compatible endpoint (a QuantizedModel's spec)."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "type(self.tensorParallelSize) == string ? self.tensorParallelSize == 'auto' "
                ": self.tensorParallelSize >= 1",
                "tensorParallelSize is 'auto' or a positive integer",
            ),
        )
    )

    source: ModelReference = Field(description="the checkpoint to serve: exactly one of job or uri")
    backend: Literal["auto", "vllm", "lmdeploy", "builtin"] = Field(
        "auto",
        description="serving engine: vllm, lmdeploy or builtin; auto (the default) picks "
        "the fastest kernel of any engine that loads the checkpoint on some node's GPUs",
    )
    replicas: Annotated[int, Field(ge=0, le=1000)] = Field(
        1, description="serving pods (0 to 1000, default 1); 0 stops serving"
    )
    resources: Resources = Field(
        default_factory=Resources, description="GPUs, CPU and memory of each serving pod"
    )
    tensor_parallel_size: int | str = Field(
        "auto",
        description="GPUs one replica's model is split over, e.g. 2; auto (the default): "
        "the fewest (a power of two) whose memory holds the checkpoint with room to spare",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    engine_args: list[str] | None = Field(
        None, description="extra serving engine flags, e.g. ['--max-model-len', '8192']"
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling, description="which nodes may run the serving pods"
    )
    api_key_secret_ref: SecretKeyReference | None = Field(
        None,
        description="Secret key holding the API key clients must send (Authorization: Bearer "
        "KEY) to the OpenAI endpoints; health endpoints stay open for probes. Default: none, "
        "the endpoint is open to whoever can reach the Service",
    )
    image: ServingImages | None = Field(
        None, description="serving images in place of the operator's defaults"
    )


ModelPhase = Literal["Pending", "Waiting", "Deploying", "Ready", "Degraded", "Failed"]


class QuantizedModelStatus(_Model):
    """What the operator reports about a QuantizedModel."""

    model_config = ConfigDict(extra="ignore")

    phase: ModelPhase | None = Field(
        None,
        description="the model's stage: Pending, Waiting (for the checkpoint), Deploying, "
        "Ready, Degraded or Failed",
    )
    observed_generation: int | None = Field(None, description=GENERATION)
    conditions: list[Condition] | None = Field(None, description=CONDITIONS)
    replicas: int | None = Field(None, description="serving pods the operator asked for")
    ready_replicas: int | None = Field(None, description="serving pods ready for requests")
    selector: str | None = Field(
        None, description="label selector of the serving pods (for the scale subresource)"
    )
    backend: str | None = Field(None, description="the serving engine chosen, e.g. vllm")
    kernel: str | None = Field(None, description="the kernel chosen, e.g. vllm/marlin")
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL, e.g. http://llama.ml.svc/v1"
    )
    last_failure: LastFailure | None = Field(
        None, description="the last cause that kept serving pods from running, with its fix"
    )


def spec_errors(err: ValidationError) -> str:
    """A spec the schema admitted but the models refuse (what only code can check, such as
    a ``dynamic`` key that is not a valid regex), in words, one clause per field."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in ("spec", *e["loc"]))
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts) + "; fix the spec (see kubectl explain)"
