"""Architectures as data: where the decoder layers are and in which groups to quantize.

True-sequential groups (paper, section 4, and the public implementations): modules in
one group read the same input, so they share one Hessian; a group is quantized before
the next one's inputs are captured, so later groups see quantized earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_GROUPS = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class Architecture:
    layers: str  # dotted path of the decoder layers' ModuleList
    groups: tuple[tuple[str, ...], ...]  # per layer, in execution order
    final_norm: str  # applied to the last layer's output before lm_head
    lm_head: str = "lm_head"


LLAMA_LIKE = Architecture("model.layers", _LLAMA_GROUPS, "model.norm")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "granite": LLAMA_LIKE,
    "olmo2": LLAMA_LIKE,
    "phi3": Architecture(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        "model.norm",
    ),
    # GPT-2 stores its projections as Conv1D (weight [in, out]).
    "gpt2": Architecture(
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        "transformer.ln_f",
    ),
}


class UnsupportedModel(ValueError):
    pass


def architecture_for(model: nn.Module) -> Architecture:
    """The table entry for ``model``, checked against the modules it really has."""
    model_type = getattr(model.config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add its decoder-layer path and "
            f"true-sequential groups to ARCHITECTURES in gptq_worker/arch.py"
        )
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError as err:
        raise UnsupportedModel(
            f"{model_type} model has no decoder-layer list at {arch.layers!r}"
        ) from err
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModel(f"{arch.layers!r} of this {model_type} model is not a layer list")
    for name in (n for group in arch.groups for n in group):
        try:
            module = layers[0].get_submodule(name)
        except AttributeError as err:
            raise UnsupportedModel(
                f"{model_type} decoder layer has no module {name!r}; the model does not have "
                f"the structure gptq_worker/arch.py expects"
            ) from err
        if not is_quantizable(module):
            raise UnsupportedModel(
                f"{model_type} module {name!r} is {type(module).__name__}, not Linear or Conv1D"
            )
    return arch


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (Conv1D stores it transposed)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Store ``[out, in]`` ``weight`` into ``module`` in its own layout and dtype."""
    w = weight.t() if _is_conv1d(module) else weight
    module.weight.data = w.to(device=module.weight.device, dtype=module.weight.dtype).contiguous()


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)``."""
    out_features, in_features = weight_matrix(module).shape
    return in_features, out_features


def quantizable_names(model: nn.Module, arch: Architecture, cfg) -> list[str]:
    """Full names of the modules ``cfg`` quantizes (``dynamic`` applied), in layer order:
    what the engine packs and what a checkpoint of this model must hold packed."""
    layers = model.get_submodule(arch.layers)
    names = [f"{arch.layers}.{i}.{n}" for i in range(len(layers)) for g in arch.groups for n in g]
    if cfg.lm_head:
        names.append(arch.lm_head)
    return [name for name in names if cfg.for_module(name) is not None]
