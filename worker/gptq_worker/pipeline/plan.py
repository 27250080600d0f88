"""Which modules get quantized with which settings, checked against their shapes up front.

A run fails here, before the first layer is computed, when a module cannot be packed or
grouped as asked, with a message that names the module and the fix.
"""

from __future__ import annotations

from torch import nn

from gptq_compat.config import ModuleSettings, QuantizeConfig
from gptq_worker.arch import Architecture, features, is_quantizable, quantizable_names
from gptq_worker.format.pack import values_per_chunk


def plan(model: nn.Module, arch: Architecture, cfg: QuantizeConfig) -> dict[str, ModuleSettings]:
    """Settings of every module that will be quantized, checked against its shape up front."""
    settings: dict[str, ModuleSettings] = {}
    for name in quantizable_names(model, arch, cfg):
        s = cfg.for_module(name)
        module = model.get_submodule(name)
        if not is_quantizable(module):
            raise ValueError(f"{name} is {type(module).__name__}, not Linear or Conv1D")
        in_features, out_features = features(module)
        if s.group_size != -1 and in_features % s.group_size:
            divisors = [d for d in (128, 64, 32, 16) if in_features % d == 0]
            hint = f"use group_size {divisors[0]} or -1" if divisors else "use group_size -1"
            raise ValueError(
                f"{name}: in_features {in_features} is not a multiple of group_size "
                f"{s.group_size}; {hint}, or skip the module with dynamic '-:{name}'"
            )
        chunk = values_per_chunk(s.bits)
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % chunk:
                raise ValueError(
                    f"{name}: {what} {size} is not a multiple of {chunk}, so {s.bits}-bit "
                    f"values cannot be packed into int32 words; skip it with dynamic '-:{name}'"
                )
        settings[name] = s
    if not settings:
        raise ValueError("no module is left to quantize: every one is skipped by 'dynamic'")
    return settings
