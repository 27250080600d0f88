"""The shape of a serving rule: which engine version it describes, where that engine's
source says so, and the check itself.

A checkpoint is described module by module (``QuantizedModule``: its settings after
``dynamic``, its shape, whether tensor parallelism splits its rows or its columns). An
engine version (``Engine``) has rules that every module must pass wherever it runs, and
kernels, each with the compute capabilities ("SM") it runs on and rules of its own. A
kernel loads a checkpoint when the engine's rules and the kernel's hold for every module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gptq_compat.config import CheckpointFormat, ModuleSettings

SM = tuple[int, int]

# Modules whose input dimension tensor parallelism splits (row-parallel in vLLM and
# LMDeploy); the others are split along their output dimension.
ROW_PARALLEL = ("o_proj", "down_proj", "dense", "fc2", "c_proj", "out_proj", "wo", "w2")


@dataclass(frozen=True)
class QuantizedModule:
    name: str
    in_features: int
    out_features: int
    settings: ModuleSettings

    @property
    def row_parallel(self) -> bool:
        return self.name.rsplit(".", 1)[-1] in ROW_PARALLEL

    def partition(self, tp: int) -> tuple[int, int]:
        """(in, out) features of one tensor-parallel shard."""
        if self.row_parallel:
            return self.in_features // tp, self.out_features
        return self.in_features, self.out_features // tp


@dataclass(frozen=True)
class Context:
    """What a rule may look at besides the module: the checkpoint's zero-point format, the
    tensor-parallel size the engine will run with, and every quantized module (for rules
    about modules an engine fuses into one)."""

    fmt: CheckpointFormat
    tp: int = 1
    modules: tuple[QuantizedModule, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One constraint of one engine version, with the source that states it.

    ``check`` returns None when the module passes, else what is wrong with it in words.
    """

    id: str
    source: str
    check: Callable[[QuantizedModule, Context], str | None]


@dataclass(frozen=True)
class Kernel:
    name: str  # "backend/kernel", e.g. "vllm/marlin"
    min_sm: SM | None  # None: runs on the CPU (and any GPU), not tied to a compute capability
    max_sm: SM | None = None
    rules: tuple[Rule, ...] = ()
    note: str = ""

    @property
    def backend(self) -> str:
        return self.name.split("/")[0]


@dataclass(frozen=True)
class Engine:
    backend: str  # "vllm" | "lmdeploy" | "builtin"
    version: str
    label: str  # "vLLM 0.32.0"
    rules: tuple[Rule, ...]
    kernels: tuple[Kernel, ...]  # in the order the engine prefers them
    how_checked: str  # "loaded by the real engine in tests/engines" or "from source"

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)


@dataclass
class Verdict:
    engine: Engine
    kernel: Kernel
    reasons: list[str] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return not self.reasons


def judge(
    engine: Engine, modules: list[QuantizedModule], fmt: CheckpointFormat, tp: int = 1
) -> list[Verdict]:
    """One verdict per kernel of ``engine`` for the whole checkpoint. Each reason names the
    rule, the engine version and the modules that break it (grouped, so 200 modules with
    one problem read as one line)."""
    ctx = Context(fmt, tp, tuple(modules))
    out = []
    for kernel in engine.kernels:
        broken: dict[tuple[str, str, str], list[str]] = {}
        for rule in (*engine.rules, *kernel.rules):
            for m in modules:
                problem = rule.check(m, ctx)
                if problem:
                    broken.setdefault((problem, rule.id, rule.source), []).append(m.name)
        reasons = [
            f"{problem} ({_names(names)}) [{engine.label} rule {rid}: {source}]"
            for (problem, rid, source), names in broken.items()
        ]
        out.append(Verdict(engine, kernel, reasons))
    return out


def _names(names: list[str], keep: int = 3) -> str:
    more = f" and {len(names) - keep} more" if len(names) > keep else ""
    return ", ".join(names[:keep]) + more


def sm_text(kernel: Kernel) -> str:
    if kernel.min_sm is None:
        return "CPU" + (" or any GPU" if kernel.backend == "builtin" else "")
    lo = f"SM >= {kernel.min_sm[0]}.{kernel.min_sm[1]}"
    if kernel.max_sm == kernel.min_sm:
        lo = f"SM {kernel.min_sm[0]}.{kernel.min_sm[1]} only"
    elif kernel.max_sm:
        lo += f", <= {kernel.max_sm[0]}.{kernel.max_sm[1]}"
    return f"{lo}{'; ' + kernel.note if kernel.note else ''}"


# -- checks that several engines share ----------------------------------------------------
def bits_in(*allowed: int) -> Callable[[QuantizedModule, Context], str | None]:
    def check(m: QuantizedModule, _: Context) -> str | None:
        b = m.settings.bits
        return None if b in allowed else f"{b}-bit (needs {' or '.join(map(str, allowed))})"

    return check


def group_in(*allowed: int) -> Callable[[QuantizedModule, Context], str | None]:
    def check(m: QuantizedModule, _: Context) -> str | None:
        g = m.settings.group_size
        return None if g in allowed else f"group_size {g} (needs one of {list(allowed)})"

    return check


def symmetric(m: QuantizedModule, _: Context) -> str | None:
    return None if m.settings.sym else "asymmetric (sym false)"


def partition_multiple(dim: str, of: int) -> Callable[[QuantizedModule, Context], str | None]:
    """``in`` or ``out`` features of each tensor-parallel shard a multiple of ``of``."""

    def check(m: QuantizedModule, ctx: Context) -> str | None:
        size = m.partition(ctx.tp)[0 if dim == "in" else 1]
        if size % of == 0:
            return None
        shard = f" per shard at tensor parallel {ctx.tp}" if ctx.tp > 1 else ""
        return f"{dim}_features {size}{shard} not a multiple of {of}"

    return check


def groups_whole_per_partition(m: QuantizedModule, ctx: Context) -> str | None:
    """A group may not straddle two tensor-parallel shards."""
    g = m.settings.group_size
    size = m.partition(ctx.tp)[0]
    if g == -1 or g >= m.in_features or size % g == 0:
        return None
    return (
        f"in_features {size} per shard at tensor parallel {ctx.tp} not a multiple of group_size {g}"
    )
