"""Command-line flags made from the settings models, so every setting has exactly one flag.

Each field of ``WorkerConfig`` and of its sections becomes ``--field-name`` (a few carry a
shorter or older name, in ``RENAMED``); its type, choices and help text come from the
model. A flag given on the command line overrides the same setting from ``--config``.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gptq_compat.config import (
    CalibrationConfig,
    EvaluationConfig,
    QuantizeConfig,
    WorkerConfig,
    load_config_file,
)


class UsageError(ValueError):
    """Bad command-line input, reported as one line with exit code 2."""


# (section of WorkerConfig, its model, the prefix its flags carry); "" is the top level
SECTIONS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("", WorkerConfig, ""),
    ("quantization", QuantizeConfig, ""),
    ("calibration", CalibrationConfig, ""),
    ("evaluation", EvaluationConfig, "eval-"),
)
RENAMED = {
    ("quantization", "checkpoint_format"): "--format",
    ("calibration", "dataset"): "--calibration",
    ("evaluation", "text"): "--eval-text",
    ("evaluation", "max_samples"): "--eval-samples",
}


def _unwrap(annotation: Any) -> Any:
    """``T | None`` and ``Annotated[T, ...]`` to ``T``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _argument(field: FieldInfo) -> dict[str, Any]:
    """argparse keywords for one field: its type, choices and help from the model."""
    kind = _unwrap(field.annotation)
    help_text = field.description or ""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if typing.get_origin(kind) is typing.Literal:
        values = typing.get_args(kind)
        return {"type": type(values[0]), "choices": values, "help": help_text}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return {"choices": [m.value for m in kind], "help": help_text}
    if kind in (int, float, str):
        return {"type": kind, "help": help_text}
    return {"type": str, "help": f"{help_text} (JSON)".strip(), "metavar": "JSON"}


def flag_name(section: str, name: str, prefix: str) -> str:
    return RENAMED.get((section, name)) or "--" + prefix + name.replace("_", "-")


def setting_flags() -> dict[str, tuple[str, str]]:
    """Flag -> (section, field) for every setting that has one."""
    out = {}
    for section, model, prefix in SECTIONS:
        for name, field in model.model_fields.items():
            if section == "" and _is_section(field):
                continue
            out[flag_name(section, name, prefix)] = (section, name)
    return out


def _is_section(field: FieldInfo) -> bool:
    kind = _unwrap(field.annotation)
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, grouped by section; unset flags stay out of the namespace."""
    for section, model, prefix in SECTIONS:
        group = parser.add_argument_group(section or "run")
        for name, field in model.model_fields.items():
            if section == "" and _is_section(field):
                continue
            group.add_argument(
                flag_name(section, name, prefix),
                dest=f"{section}.{name}" if section else name,
                default=argparse.SUPPRESS,
                **_argument(field),
            )


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """camelCase keys of a config file to snake_case (not inside ``dynamic``)."""
    out = {_snake(k): v for k, v in data.items()}
    for section in ("quantization", "calibration", "evaluation"):
        if isinstance(out.get(section), dict):
            out[section] = {
                (k if k == "dynamic" else _snake(k)): v for k, v in out[section].items()
            }
    return out


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Config file (if any) overlaid with the flags given on the command line."""
    config_file = getattr(args, "config", None)
    data: dict[str, Any] = _normalise(load_config_file(config_file)) if config_file else {}
    for dest, value in vars(args).items():
        section, _, name = dest.rpartition(".")
        if section:
            if name == "dynamic" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise UsageError(f"--dynamic is not valid JSON: {err}") from err
            data.setdefault(section, {})[name] = value
        elif name in WorkerConfig.model_fields:
            data[name] = value
    for key in ("model", "output"):
        if key not in data:
            raise UsageError(f"--{key} is required (on the command line or in --config)")
    return WorkerConfig.model_validate(data)
