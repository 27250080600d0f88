"""The quality gate: did perplexity stay within bounds, and what the next attempt changes."""

from __future__ import annotations

from gptq_operator.api import QualityGate, QuantizationJobSpec

REMEDIATIONS = {
    "descAct": ("act-order (descAct)", lambda q: q.model_copy(update={"desc_act": True})),
    "smallerGroup": (
        "halved group size",
        lambda q: q.model_copy(
            update={"group_size": max(32, q.group_size // 2) if q.group_size > 0 else 128}
        ),
    ),
    "eightBit": ("8-bit", lambda q: q.model_copy(update={"bits": 8})),
    # the scale grid search: slower (3-5x on the benchmark model), best at 3 bits and asym
    "mseScales": ("MSE-searched scales", lambda q: q.model_copy(update={"mse": 2.4})),
}


def spec_for_attempt(spec: QuantizationJobSpec, status: dict, attempt: int) -> QuantizationJobSpec:
    """The spec with the remediation steps of attempts 2..attempt applied, in order."""
    ladder = (spec.quality_gate.remediation if spec.quality_gate else None) or []
    quantization = spec.quantization
    for step in ladder[: attempt - 1]:
        quantization = REMEDIATIONS[step][1](quantization)
    return spec.model_copy(update={"quantization": quantization})


def gate_verdict(
    gate: QualityGate | None, before: float | None, after: float | None
) -> tuple[bool, str]:
    if gate is None:
        return True, "no quality gate"
    if before is None or after is None:
        return False, "the worker reported no perplexity to check the quality gate with"
    increase = after - before
    if gate.max_perplexity_increase is not None and increase > gate.max_perplexity_increase:
        return False, (
            f"perplexity rose {increase:.4f} ({before:.4f} -> {after:.4f}), more than "
            f"maxPerplexityIncrease {gate.max_perplexity_increase}"
        )
    percent = 100 * increase / before if before else float("inf")
    if (
        gate.max_perplexity_increase_percent is not None
        and percent > gate.max_perplexity_increase_percent
    ):
        return False, (
            f"perplexity rose {percent:.2f}% ({before:.4f} -> {after:.4f}), more "
            f"than maxPerplexityIncreasePercent {gate.max_perplexity_increase_percent}"
        )
    return True, f"perplexity {before:.4f} -> {after:.4f} is within the gate"
