"""LMDeploy TurboMind 0.18.0: which GPTQ checkpoints it loads, and on which GPUs.

Checked from source, not by a run: TurboMind needs CUDA, which the test machines lack.
Paths are inside the ``lmdeploy`` package of the 0.18.0 wheel on PyPI; a test
(``tests/engines/test_lmdeploy_source.py``) reads them from that wheel and fails when a
cited line no longer says what the rule assumes.
"""

from __future__ import annotations

from gptq_compat.config import CheckpointFormat
from gptq_compat.rules import Context, Engine, Kernel, QuantizedModule, Rule, bits_in, group_in

VERSION = "0.18.0"
_CONVERTER = "turbomind/converter.py"
_FORMAT = "turbomind/weight_format.py"


def _no_act_order(m: QuantizedModule, _: Context) -> str | None:
    return "desc_act true" if m.settings.desc_act else None


def _sym(m: QuantizedModule, _: Context) -> str | None:
    return None if m.settings.sym else "asymmetric (sym false)"


def _v1_zeros(_: QuantizedModule, ctx: Context) -> str | None:
    if ctx.fmt == CheckpointFormat.GPTQ:
        return None
    return "gptq_v2 zero points (TurboMind adds 1 to every stored zero: it reads v1 only)"


TURBOMIND = Kernel(
    "lmdeploy/turbomind",
    (7, 0),
    (12, 0),
    note="built for SM 7.0, 7.5, 8.0, 8.6, 8.9, 9.0a, 10.0a, 12.0a "
    "(the sm_ targets in _turbomind.so of the 0.18.0 wheel)",
)

LMDEPLOY_0_18 = Engine(
    backend="lmdeploy",
    version=VERSION,
    label=f"LMDeploy {VERSION}",
    rules=(
        Rule(
            "sym-no-act-order",
            f"{_CONVERTER}:193-195 (assert not desc_act and sym)",
            lambda m, c: _sym(m, c) or _no_act_order(m, c),
        ),
        Rule("group-128", f"{_CONVERTER}:100 (_SUPPORTED_GROUP_SIZES gptq: 128)", group_in(128)),
        Rule("4-bit", f"{_FORMAT}:271-303 (GPTQFormat unpacks uint4)", bits_in(4)),
        Rule("v1-zeros", f"{_FORMAT}:297,303 (zeros +1 offset)", _v1_zeros),
    ),
    kernels=(TURBOMIND,),
    how_checked="from source (TurboMind needs CUDA)",
)
