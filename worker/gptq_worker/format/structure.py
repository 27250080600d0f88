"""Does a checkpoint hold exactly the tensors its model needs?

The model is built from ``config.json`` on the meta device (no weights are made) and its
state dict is compared with the checkpoint: each module the quantize config quantizes
needs ``qweight``/``qzeros``/``scales``/``g_idx`` (and its bias when the module has one),
every other parameter a dense tensor of the model's shape (a tied ``lm_head`` may be
left out), and nothing else may be there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptq_compat.config import QuantizeConfig
from gptq_worker.arch import architecture_for, quantizable_names
from gptq_worker.format.checkpoint import QUANT_SUFFIXES
from gptq_worker.format.tensorfiles import described

_LIST = 5  # names shown per problem


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _LIST} more" if len(keys) > _LIST else ""
    return ", ".join(keys[:_LIST]) + more


def skeleton(directory: Path):
    """The model of ``directory/config.json`` on the meta device; raises on a bad config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


def _quantized_names(model, cfg: QuantizeConfig, packed: set[str]) -> set[str]:
    """Modules the config quantizes: from the architecture table, else what is packed."""
    try:
        arch = architecture_for(model)
    except ValueError:  # an architecture the table does not know: trust the packed set
        return set(packed)
    return set(quantizable_names(model, arch, cfg))


def _tied(model, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    return any(key == f"{n}.weight" for n, m in model.named_modules() if m is out)


def check_structure(
    directory: Path, tensors: dict[str, torch.Tensor], cfg: QuantizeConfig
) -> list[str]:
    """The structural errors of the checkpoint in ``directory`` (empty when it is whole)."""
    errors: list[str] = []
    config_file = directory / "config.json"
    if not config_file.exists():
        errors.append(
            f"{config_file} is missing; copy the model's config.json (with its "
            "quantization_config) into the checkpoint"
        )
        return errors
    try:
        model = skeleton(directory)
    except Exception as err:  # transformers raises many types for a config it cannot use
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        errors.append(
            f"{config_file}: cannot build the model from it ({message}); fix config.json "
            "(it must be the original model's config with quantization_config added)"
        )
        return errors
    packed = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    quantized = _quantized_names(model, cfg, packed)
    expected: dict[str, torch.Tensor | None] = {}  # name -> model tensor (None: packed part)
    missing: list[str] = []
    for key, t in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = key.rpartition(".")
        if (prefix in quantized or prefix in packed) and leaf == "weight":
            names = [f"{prefix}.{s}" for s in QUANT_SUFFIXES]
            expected.update(dict.fromkeys(names))
            if f"{prefix}.weight" in tensors and f"{prefix}.qweight" not in tensors:
                errors.append(
                    f"{prefix}: stored dense, but the quantize config says it is quantized; "
                    f"re-quantize, or mark it unquantized with dynamic '-:{prefix}'"
                )
                expected[key] = t
                continue
            absent = [n for n in names if n not in tensors]
            if len(absent) == len(names):
                missing.append(f"{prefix} (qweight, qzeros, scales, g_idx)")
            continue  # a partial set is reported by the module check
        expected[key] = t
        if key not in tensors and not _tied(model, key):
            missing.append(key)
    if missing:
        errors.append(
            f"tensors the model needs are not in any shard: {_names(missing)}; the checkpoint "
            "is incomplete, copy it again or re-quantize"
        )
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        errors.append(
            f"tensors the model does not have: {_names(extra)}; remove them or check that "
            "config.json belongs to these weights"
        )
    for key, want in expected.items():
        got = described(tensors, key)
        if want is None or got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            errors.append(
                f"{key}: shape {list(got.shape)}, but config.json's model needs "
                f"{list(want.shape)}; check that config.json belongs to these weights"
            )
        elif want.is_floating_point() and not got.is_floating_point():
            errors.append(
                f"{key}: dtype {got.dtype}, expected a floating point tensor; re-quantize"
            )
    return errors
