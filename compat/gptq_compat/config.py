"""Settings of a quantization run: one pydantic model for the CLI, config files and the CRD.

Torch-free on purpose: the operator imports these models to embed them in its
CustomResourceDefinitions, so a spec field is defined exactly once.
Field names are snake_case in Python and in ``quantize_config.json``; the CRD
and config files may also use the camelCase aliases (``groupSize``).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

SUPPORTED_BITS = (2, 3, 4, 8)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class CheckpointFormat(str, Enum):
    """How zero points are stored: ``gptq`` (v1) stores ``zero - 1``, ``gptq_v2`` the true zero."""

    GPTQ = "gptq"
    GPTQ_V2 = "gptq_v2"


class Method(str, Enum):
    """``gptq`` is the second-order solve; ``rtn`` is round-to-nearest, the baseline."""

    GPTQ = "gptq"
    RTN = "rtn"


# Keys of a ``dynamic`` override that change how one module is quantized.
OVERRIDABLE = ("bits", "group_size", "sym", "desc_act", "damp_percent", "static_groups", "mse")


class ModuleSettings(_Model):
    """The settings that apply to one module once ``dynamic`` overrides are resolved."""

    bits: Literal[2, 3, 4, 8] = Field(
        4, description="bits per weight: 2, 3, 4 (the default) or 8; fewer is smaller and lossier"
    )
    group_size: int = Field(
        128,
        description="weight columns that share one scale and zero point, e.g. 32, 64 or 128 "
        "(the default); -1: one group per output channel",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == -1 || self >= 1",
                    "message": "groupSize must be -1 (one group per output channel) or a "
                    "positive number of columns, e.g. 128",
                }
            ]
        },
    )
    sym: bool = Field(
        True,
        description="symmetric quantization: zero points fixed at the middle of the grid "
        "(default true; many serving kernels need it)",
    )
    # act-order with static groups (and GPTAQ below) are on by default: chosen from
    # bench/quality.py and bench/speed.py (bench/README.md). Static groups keep g_idx in
    # column order, so the checkpoint loads in every kernel exactly as without act-order.
    desc_act: bool = Field(
        True, description="act-order: quantize columns in order of decreasing Hessian diagonal"
    )
    static_groups: bool = Field(
        True,
        description="group scales from the unpermuted weights before the solve (g_idx stays "
        "in column order, so act-order checkpoints load in every kernel)",
    )
    damp_percent: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="dampening added to the Hessian's diagonal, as a fraction of its mean "
        "(between 0 and 1, default 0.01); grows by dampAutoIncrement while Cholesky fails",
    )
    mse: float = Field(0.0, ge=0, description="Norm of the scale grid search; 0 turns it off.")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(
                f"group_size {value} is invalid; use -1 (per channel) or a positive size"
            )
        return value


class QuantizeConfig(ModuleSettings):
    """How to quantize a model: the ``quantization`` block of a QuantizationJob."""

    method: Method = Field(
        Method.GPTQ,
        description="gptq (the default): the second-order solve; rtn: round-to-nearest, the "
        "baseline",
    )
    gptaq: bool = Field(
        True,
        description=(
            "GPTAQ asymmetric calibration (arXiv:2504.02692; GPTQModel's gptaq, formerly "
            "v2): a full-precision copy of the calibration activations travels beside the "
            "quantized ones and each layer minimises ||Q X~ - W X|| (X~: the quantized "
            "model's inputs, X: the full-precision model's) instead of ||Q X~ - W X~||."
        ),
    )
    gptaq_alpha: float = Field(
        0.25, gt=0, le=1, description="Weight of GPTAQ's asymmetric term (GPTQModel's alpha)."
    )
    true_sequential: bool = Field(
        True,
        description="quantize a layer's modules in order (attention before MLP), each "
        "calibrated on the inputs the previous ones' quantized outputs give (default true)",
    )
    damp_auto_increment: float = Field(
        0.0025, gt=0, lt=1, description="Added to damp_percent each time Cholesky fails."
    )
    checkpoint_format: CheckpointFormat = Field(
        CheckpointFormat.GPTQ,
        description="how zero points are stored: gptq (v1, the default; what serving engines "
        "load) stores zero - 1, gptq_v2 the true zero",
    )
    lm_head: bool = Field(
        False, description="also quantize the output projection lm_head (default false)"
    )
    dynamic: dict[str, dict[str, Any]] | None = Field(
        None,
        description=(
            "Per-module overrides keyed by regex (GPTQModel syntax): '+:regex' (or a plain "
            "regex) overrides settings, '-:regex' leaves the module unquantized; e.g. "
            '{"+:.*down_proj": {"bits": 8}, "-:.*mlp.gate": {}}. Overridable: bits, group_size, '
            "sym, desc_act, damp_percent, static_groups, mse."
        ),
        # The API server refuses empty patterns; whether a key is a valid regex and which
        # settings it overrides are checked by the operator (pydantic, below) at reconcile.
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(k, !(k in ['', '+:', '-:']))",
                    "message": "a dynamic key is a module regex, '+:regex' (override) or "
                    "'-:regex' (leave unquantized); the regex cannot be empty",
                }
            ]
        },
    )

    @field_validator("dynamic")
    @classmethod
    def _dynamic(cls, value: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        if value is None:
            return None
        for key, overrides in value.items():
            pattern = key[2:] if key.startswith(("+:", "-:")) else key
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"dynamic key {key!r} is not a valid regex: {err}") from err
            unknown = sorted(set(overrides) - set(OVERRIDABLE))
            if unknown:
                raise ValueError(
                    f"dynamic[{key!r}] sets {unknown}; overridable keys are {list(OVERRIDABLE)}"
                )
            ModuleSettings(**{**_settings_fields(ModuleSettings()), **overrides})
        return value

    def for_module(self, name: str) -> ModuleSettings | None:
        """Settings for module ``name`` after ``dynamic``; None when a ``-:`` rule skips it.

        Negative rules are checked first; then the first positive rule that matches
        (``re.match``, as GPTQModel and vLLM do) wins.
        """
        base = _settings_fields(self)
        if not self.dynamic:
            return ModuleSettings(**base)
        for key in self.dynamic:
            if key.startswith("-:") and re.match(key[2:], name):
                return None
        for key, overrides in self.dynamic.items():
            if key.startswith("-:"):
                continue
            pattern = key[2:] if key.startswith("+:") else key
            if re.match(pattern, name):
                return ModuleSettings(**{**base, **overrides})
        return ModuleSettings(**base)


def _settings_fields(settings: ModuleSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in ModuleSettings.model_fields}


class CalibrationProfile(str, Enum):
    GENERAL = "general"
    CODE = "code"
    LONG_CONTEXT = "long-context"


# (nsamples, seqlen) per profile.
PROFILES: dict[CalibrationProfile, tuple[int, int]] = {
    CalibrationProfile.GENERAL: (128, 2048),
    CalibrationProfile.CODE: (256, 2048),
    CalibrationProfile.LONG_CONTEXT: (128, 4096),
}


class CalibrationConfig(_Model):
    """Where calibration text comes from and how much of it to use."""

    dataset: str | None = Field(
        None,
        description=(
            "A local .txt/.jsonl/.parquet file or a directory of them, or a Hugging Face "
            "dataset name (needs network). Required to quantize."
        ),
    )
    profile: CalibrationProfile = Field(
        CalibrationProfile.GENERAL,
        description="preset amount of text: general (the default, 128 samples of 2048 "
        "tokens), code (256 of 2048) or long-context (128 of 4096)",
    )
    nsamples: Annotated[int, Field(ge=1)] | None = Field(
        None, description="calibration samples, e.g. 128; default: the profile's"
    )
    seqlen: Annotated[int, Field(ge=8)] | None = Field(
        None, description="tokens per sample (at least 8), e.g. 2048; default: the profile's"
    )
    seed: int = Field(0, description="seed of the sample draw (default 0), for repeatable runs")

    def resolved(self) -> tuple[int, int]:
        """(nsamples, seqlen): explicit values, else the profile's."""
        nsamples, seqlen = PROFILES[self.profile]
        return self.nsamples or nsamples, self.seqlen or seqlen


class EvaluationConfig(_Model):
    """Held-out text scored before and after quantization (the quality gate's numbers)."""

    text: str = Field(description="UTF-8 text file; its first windows are scored")
    seqlen: Annotated[int, Field(ge=8)] | None = Field(None, description="default: calibration's")
    max_samples: Annotated[int, Field(ge=1)] = 32


class WorkerConfig(_Model):
    """Everything ``gptq-worker quantize`` needs; the shape of ``--config FILE``."""

    model: str
    revision: str | None = Field(None, description="branch, tag or commit of a hub model")
    output: str
    quantization: QuantizeConfig = QuantizeConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig | None = None
    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass of a layer")
    hessian_precision: Literal["tensor-core", "fp32"] = Field(
        "tensor-core",
        description="tensor-core: fp16/bf16 products on the GPU's matrix units into fp32 "
        "(fast; accumulation slightly below IEEE fp32); fp32: convert inputs to fp32 first",
    )
    max_shard_size: str = "4GB"
    trust_remote_code: bool = False
    progress_file: str | None = None
    overwrite: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", value.upper())
        if not m:
            raise ValueError(f"max_shard_size {value!r} is not a size like '4GB' or '500MB'")
        if float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2) or "B"] < 1:
            raise ValueError(f"max_shard_size {value!r} must be at least 1 byte, e.g. '4GB'")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> WorkerConfig:
        output = Path(self.output).expanduser().resolve()
        model = Path(self.model).expanduser().resolve()
        if model == output:
            raise ValueError("output must differ from model: the source would be overwritten")
        inputs = [("model", self.model, model)]
        if self.calibration.dataset and Path(self.calibration.dataset).expanduser().exists():
            dataset = self.calibration.dataset
            inputs.append(("calibration data", dataset, Path(dataset).expanduser().resolve()))
        for what, given, path in inputs:
            if path == output or path.is_relative_to(output) or output.is_relative_to(path):
                raise ValueError(
                    f"output {self.output} overlaps the {what} {given} (the same path, or one "
                    "inside the other); writing it could delete the source: choose an output "
                    "outside both"
                )
        return self


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (validated later, with CLI overrides)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"config file {path} is not UTF-8 text (byte {err.start}); pass a YAML or JSON file"
        ) from err
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise ValueError(f"config file {path} is not valid YAML/JSON: {first}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data
