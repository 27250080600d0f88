"""Which serving kernels can load a GPTQ checkpoint (docs/serving-compatibility.md), and why not.

Torch-free: the operator uses the same table to pick a backend and the nodes' minimum
compute capability ("SM"). A checkpoint is described by the settings of each quantized
module (after ``dynamic``) and its shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptq_compat.config import CheckpointFormat, ModuleSettings


@dataclass(frozen=True)
class QuantizedModule:
    name: str
    in_features: int
    out_features: int
    settings: ModuleSettings


@dataclass(frozen=True)
class Kernel:
    name: str  # e.g. "vllm/gptq_marlin"
    backend: str  # "vllm" | "lmdeploy" | "builtin"
    min_sm: tuple[int, int] | None  # None: runs on CPU too
    max_sm: tuple[int, int] | None = None
    sm_note: str = ""


@dataclass
class Verdict:
    kernel: Kernel
    reasons: list[str] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return not self.reasons


GPTQ_MARLIN = Kernel("vllm/gptq_marlin", "vllm", (8, 0), sm_note="newest vLLM: SM 7.5")
MACHETE = Kernel("vllm/machete", "vllm", (9, 0), (9, 0))
EXLLAMA = Kernel("vllm/gptq", "vllm", (6, 0), sm_note="fp16 activations only")
TURBOMIND = Kernel(
    "lmdeploy/turbomind",
    "lmdeploy",
    (7, 0),
    (8, 9),
    sm_note="SM 7.0/7.5/8.0/8.6/8.9; 9.0 in newer builds",
)
BUILTIN = Kernel("builtin/torch", "builtin", None)
KERNELS = (GPTQ_MARLIN, MACHETE, EXLLAMA, TURBOMIND, BUILTIN)

_V1_ONLY = "vLLM reads zero points as v1 (gptq); this checkpoint is gptq_v2"


def _marlin_reasons(m: QuantizedModule) -> list[str]:
    s, reasons = m.settings, []
    if not s.sym:
        reasons.append(f"{m.name}: asymmetric (sym false)")
    if s.bits not in (4, 8):
        reasons.append(f"{m.name}: {s.bits}-bit (needs 4 or 8)")
    if s.group_size not in (-1, 32, 64, 128):
        reasons.append(f"{m.name}: group_size {s.group_size} (needs -1, 32, 64 or 128)")
    if s.desc_act and s.group_size == -1:
        reasons.append(f"{m.name}: desc_act with group_size -1")
    if m.out_features % 64:
        reasons.append(f"{m.name}: out_features {m.out_features} not a multiple of 64")
    if m.in_features % 128:
        reasons.append(f"{m.name}: in_features {m.in_features} not a multiple of 128")
    return reasons


def _machete_reasons(m: QuantizedModule) -> list[str]:
    s, reasons = m.settings, []
    if not s.sym:
        reasons.append(f"{m.name}: asymmetric (sym false)")
    if s.bits not in (4, 8):
        reasons.append(f"{m.name}: {s.bits}-bit (needs 4 or 8)")
    if s.group_size not in (-1, 128):
        reasons.append(f"{m.name}: group_size {s.group_size} (needs -1 or 128)")
    return reasons


def _exllama_reasons(m: QuantizedModule) -> list[str]:
    return [] if m.settings.bits in (2, 3, 4, 8) else [f"{m.name}: {m.settings.bits}-bit"]


def _turbomind_reasons(m: QuantizedModule) -> list[str]:
    s, reasons = m.settings, []
    if s.bits != 4:
        reasons.append(f"{m.name}: {s.bits}-bit (needs 4)")
    if s.group_size != 128:
        reasons.append(f"{m.name}: group_size {s.group_size} (needs 128)")
    if not s.sym:
        reasons.append(f"{m.name}: asymmetric (sym false)")
    if s.desc_act:
        reasons.append(f"{m.name}: desc_act (act-order) is not supported")
    return reasons


_RULES = {
    GPTQ_MARLIN.name: _marlin_reasons,
    MACHETE.name: _machete_reasons,
    EXLLAMA.name: _exllama_reasons,
    TURBOMIND.name: _turbomind_reasons,
    BUILTIN.name: lambda m: [],
}


def serving_kernels(modules: list[QuantizedModule], fmt: CheckpointFormat) -> list[Verdict]:
    """One verdict per kernel; a kernel loads the checkpoint only if it takes every module.

    Reasons are deduplicated across modules ("and N more" past the first few).
    """
    verdicts = []
    for kernel in KERNELS:
        reasons: list[str] = []
        if kernel.backend in ("vllm", "lmdeploy") and fmt != CheckpointFormat.GPTQ:
            reasons.append(
                _V1_ONLY
                if kernel.backend == "vllm"
                else "LMDeploy reads zero points as v1 (gptq); this is gptq_v2"
            )
        module_reasons = [r for m in modules for r in _RULES[kernel.name](m)]
        reasons.extend(_summarise(module_reasons))
        verdicts.append(Verdict(kernel, reasons))
    return verdicts


def _summarise(reasons: list[str], keep: int = 3) -> list[str]:
    # Group "module: problem" by problem so 200 modules with one problem read as one line.
    by_problem: dict[str, list[str]] = {}
    for r in reasons:
        name, _, problem = r.partition(": ")
        by_problem.setdefault(problem, []).append(name)
    out = []
    for problem, names in by_problem.items():
        shown = ", ".join(names[:keep])
        more = f" and {len(names) - keep} more" if len(names) > keep else ""
        out.append(f"{problem} ({shown}{more})")
    return out


def sm_text(kernel: Kernel) -> str:
    if kernel.min_sm is None:
        return "CPU or any GPU"
    lo = f"SM >= {kernel.min_sm[0]}.{kernel.min_sm[1]}"
    if kernel.max_sm == kernel.min_sm:
        lo = f"SM {kernel.min_sm[0]}.{kernel.min_sm[1]} only"
    elif kernel.max_sm:
        lo += f", <= {kernel.max_sm[0]}.{kernel.max_sm[1]}"
    return f"{lo}{'; ' + kernel.sm_note if kernel.sm_note else ''}"
