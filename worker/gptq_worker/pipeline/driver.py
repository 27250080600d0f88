"""The layer-by-layer driver around the GPTQ core (paper, section 4 and Algorithm 1's outer loop).

1. Capture (``capture.py``): layer 0's inputs and every argument each layer receives.
2. Per layer, on the accelerator: for each true-sequential group, run the layer with a
   pre-hook on the group's first module that folds its input into one shared Hessian
   and stops the forward there; quantize the group's modules; then re-run the whole layer
   with quantized weights so the next layer sees quantized inputs.
Only the current layer is on the accelerator; the rest of the model stays on the CPU, or
on disk when it is streamed (``source.py``).

It is longer than 400 lines because the per-layer order of passes, Hessians and solves is
one sequence whose steps share the layer's state; the steps themselves live in
``split.py``, ``hessians.py`` and ``checkpoint_stream.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptq_compat.config import CheckpointFormat, Method, ModuleSettings, QuantizeConfig
from gptq_worker.arch import (
    Architecture,
    features,
    set_weight_matrix,
    weight_matrix,
)
from gptq_worker.format.pack import (
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
)
from gptq_worker.pipeline.capture import Activations, forward_layer_in_place, layer_output
from gptq_worker.pipeline.clock import since
from gptq_worker.pipeline.hessians import FullPrecisionStream, collect_hessians
from gptq_worker.pipeline.mover import LayerMover, Phases
from gptq_worker.pipeline.norms import fuse_norms
from gptq_worker.pipeline.split import LayerSplit, forward_from
from gptq_worker.pipeline.state import WorkState
from gptq_worker.progress.events import Progress
from gptq_worker.quant.gptq import (
    QuantizedWeight,
    finds_groups_in_block,
    gptq_quantize,
    rtn_quantize,
)
from gptq_worker.quant.hessian import Hessian

if TYPE_CHECKING:
    from gptq_worker.pipeline.eval_stream import EvalStreams
    from gptq_worker.pipeline.source import StreamedLayers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine computes, not what it writes (the checkpoint format is QuantizeConfig's).

    The defaults are the fast path. ``hessian_precision="fp32"``, ``solver="torch"`` and
    ``fuse=False`` give the straightforward path the equality tests compare against.
    """

    hessian_precision: str = "tensor-core"  # or "fp32"
    solver: str = "auto"  # "torch", "triton", or auto: Triton on CUDA
    fuse: bool = True  # modules that share a Hessian and settings are solved as one matrix
    # the layers' RMSNorms in one kernel on a GPU (norms.py); GPTQ_WORKER_FUSED_NORMS=0: not
    fused_norms: bool = field(
        default_factory=lambda: os.environ.get("GPTQ_WORKER_FUSED_NORMS", "1") != "0"
    )
    # the attention half replayed from o_proj's kept inputs in the pass that moves the
    # stream to h_mid (split.py); GPTQ_WORKER_REPLAY_ATTENTION=0: computed again
    replay_attention: bool = field(
        default_factory=lambda: os.environ.get("GPTQ_WORKER_REPLAY_ATTENTION", "1") != "0"
    )
    profile: bool = field(default_factory=lambda: os.environ.get("GPTQ_WORKER_PROFILE") == "1")


def _solve(
    weight: torch.Tensor,
    H: torch.Tensor | None,
    s: ModuleSettings,
    cfg: QuantizeConfig,
    solver: str = "auto",
    dXXT: torch.Tensor | None = None,
) -> QuantizedWeight:
    min_zero = 1 if cfg.checkpoint_format == CheckpointFormat.GPTQ and not s.sym else 0
    if H is None:
        return rtn_quantize(
            weight, bits=s.bits, group_size=s.group_size, sym=s.sym, mse=s.mse, min_zero=min_zero
        )
    return gptq_quantize(
        weight,
        H,
        bits=s.bits,
        group_size=s.group_size,
        sym=s.sym,
        desc_act=s.desc_act,
        static_groups=s.static_groups,
        damp_percent=s.damp_percent,
        damp_increment=cfg.damp_auto_increment,
        mse=s.mse,
        min_zero=min_zero,
        solver=solver,
        dXXT=dXXT,
        gptaq_alpha=cfg.gptaq_alpha,
    )


def _solve_group(
    layer: nn.Module,
    group: list[str],
    names: dict[str, str],
    H: torch.Tensor | None,
    settings: dict[str, ModuleSettings],
    cfg: QuantizeConfig,
    options: EngineOptions,
    dXXT: torch.Tensor | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the modules of one group. GPTQ treats rows independently given ``H``, so
    modules that share ``H`` and settings (q/k/v, gate/up) are stacked and solved once."""
    modules = [layer.get_submodule(short) for short in group]
    same = all(settings[names[short]] == settings[names[group[0]]] for short in group)
    if options.fuse and same and len(group) > 1:
        weights = [weight_matrix(m) for m in modules]
        s = settings[names[group[0]]]
        q = _solve(torch.cat(weights, 0), H, s, cfg, options.solver, dXXT)
        out, start = {}, 0
        for short, w in zip(group, weights, strict=True):
            out[short] = q.rows(start, start + w.shape[0])
            start += w.shape[0]
        return out
    return {
        short: _solve(weight_matrix(m), H, settings[names[short]], cfg, options.solver, dXXT)
        for short, m in zip(group, modules, strict=True)
    }


def packed_tensors(
    prefix: str, q: QuantizedWeight, bits: int, fmt: CheckpointFormat
) -> dict[str, torch.Tensor]:
    """Packed on the solve's device (fast on a GPU); the caller moves them to the CPU."""
    return {
        f"{prefix}.qweight": pack_qweight(q.codes, bits),
        f"{prefix}.qzeros": pack_qzeros(q.zeros, bits, fmt),
        f"{prefix}.scales": q.scales.half().contiguous(),
        f"{prefix}.g_idx": q.g_idx.to(torch.int32).clone(),  # fused modules share g_idx
    }


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On the CPU; from CUDA into pinned memory on the current stream, which is then
    synchronized (asynchronous copies from pinned memory overlap the compute stream, copies
    to pageable memory did not)."""
    if not any(v.is_cuda for v in tensors.values()):
        return {k: v.to("cpu") for k, v in tensors.items()}
    out = {k: v.to("cpu", non_blocking=True) for k, v in tensors.items()}
    for device in {v.device for v in tensors.values() if v.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return out


def _unpinned(t: torch.Tensor) -> torch.Tensor:
    if not t.is_pinned():
        return t
    out = torch.empty(t.shape, dtype=t.dtype)
    return out.copy_(t)


def restore_weight(
    module: nn.Module,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    bits: int,
    fmt: CheckpointFormat,
) -> None:
    """Put the dequantized weight that ``tensors`` describe back into ``module``."""
    w = dequantize_packed(
        tensors[f"{prefix}.qweight"],
        tensors[f"{prefix}.qzeros"],
        tensors[f"{prefix}.scales"],
        tensors[f"{prefix}.g_idx"],
        bits,
        fmt,
    )
    set_weight_matrix(module, w)


class WarmUp:
    """The warm-up's thread (:func:`warm_up_solver`), and the point where the engine needs it.

    The engine calls :meth:`wait` before its first solve, not before its first layer: the
    layer's move to the GPU and its first forwards overlap what is left of the warm-up. A
    rehearsal (:func:`rehearse`) not begun by then is skipped: the first solve loads what
    it would have loaded, and waiting for it would only add its time. Until then the two
    threads touch different Triton kernels (the solver's here, the fused norms' in the
    engine), and Triton's compiler is not shared between threads."""

    def __init__(self, run: Callable[[threading.Event], None]) -> None:
        self.late = threading.Event()
        self.thread = threading.Thread(
            target=run, args=(self.late,), name="gptq-triton-warm-up", daemon=True
        )
        self.thread.start()

    def wait(self) -> None:
        self.late.set()
        self.thread.join()


@torch.no_grad()
def warm_up_solver(
    device: torch.device,
    options: EngineOptions,
    in_child: bool = False,
    cfg: QuantizeConfig | None = None,
    norms: tuple[int, torch.dtype] | None = None,
) -> WarmUp | None:
    """Compile the Triton solve in the background while calibration inputs are captured.

    ``in_child``: compile in a child process first (:func:`_start_child`), for a caller
    with seconds of other work to overlap (the ``quantize`` command, which opens the model
    meanwhile); the child's own start (importing torch) is seconds too, so where only the
    capture overlaps (a model already in memory) the thread compiles in this process. The
    CUDA libraries load here while the child compiles.
    ``cfg``: also the kernel's variant that finds group parameters, where its settings
    have the block solver find them (:func:`solver_finds_groups`), and the rehearsal of the
    run's solve. ``norms`` (the model's hidden size and dtype): the child compiles the
    fused RMSNorm's kernel too (``norms.py``), where ``options`` fuse them; the engine loads
    it from Triton's cache at its first norm."""
    if device.type != "cuda" or options.solver == "torch":
        return None
    find = solver_finds_groups(cfg) if cfg is not None else None
    norms = norms if options.fused_norms else None
    try:
        from gptq_worker.quant.solve_triton import warm_up
    except ImportError:
        return None

    def run(late: threading.Event) -> None:
        try:
            child = _start_child(device, find, norms) if in_child else None
            _load_libraries(device)
            log.info("warm-up: CUDA libraries loaded, %s", since())
            if child is not None:
                _wait_child(child)
                log.info("warm-up: kernels compiled in a child process, %s", since())
            warm_up(device, find)  # a hit in Triton's cache when the child compiled
            log.info("warm-up: solver kernels loaded, %s", since())
            if cfg is not None and not late.is_set():
                rehearse(device, cfg, options)
                log.info("warm-up: solve and packing rehearsed, %s", since())
        except Exception as err:  # what it did not load loads at first use
            log.info("warm-up stopped early: %s: %s", type(err).__name__, err)

    key = str(device)
    if key not in _WARMING:  # once per process and device
        _WARMING[key] = WarmUp(run)
    return _WARMING[key]


_WARMING: dict[str, WarmUp] = {}


def solver_finds_groups(cfg: QuantizeConfig) -> tuple[int, bool, bool] | None:
    """``(group size, sym, gptaq)`` where ``cfg``'s own settings have the block solver find
    each block's group parameters (:func:`gptq_worker.quant.gptq.gptq_quantize`), else None."""
    if cfg.method == Method.RTN or not finds_groups_in_block(
        cfg.group_size, cfg.static_groups, cfg.mse
    ):
        return None
    return cfg.group_size, cfg.sym, cfg.gptaq


def _load_libraries(device: torch.device) -> None:
    """Load cuSOLVER and cuBLAS(Lt) for the solve and the Hessians now, off the main thread
    (their first use otherwise falls in the first layer)."""
    a = torch.eye(64, device=device)
    L, _ = torch.linalg.cholesky_ex(a)
    torch.linalg.solve_triangular(L, a, upper=False)
    _ = a @ a
    h = a.half()
    with contextlib.suppress(TypeError, RuntimeError):
        torch.mm(h, h, out_dtype=torch.float32)
    torch.cuda.synchronize(device)


@torch.no_grad()
def rehearse(device: torch.device, cfg: QuantizeConfig, options: EngineOptions) -> None:
    """Solve and pack one small matrix with the run's settings (and sort a vector the width
    of a large MLP input), so that the GPU kernels they launch are loaded before the first
    layer: CUDA loads a kernel's code at its first launch, and on an H200 the first layer's
    act-order sorts alone waited 0.5 s for that while the GPU idled
    (bench/results/speed-layer-trace-first-llama-3-8b-default-h200-2026-12-02.txt)."""
    n = 4096  # a multiple of every usual group size
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(n, 256, device=device, generator=gen)
    H = A @ A.t() + torch.eye(n, device=device)
    W = torch.randn(256, n, device=device, generator=gen)
    dXXT = 0.01 * torch.randn(n, n, device=device, generator=gen) if cfg.gptaq else None
    if cfg.method == Method.RTN:
        H = dXXT = None
    q = _solve(W, H, cfg, cfg, options.solver, dXXT)
    packed_tensors("rehearsal", q, cfg.bits, cfg.checkpoint_format)
    _ = q.loss
    for width in (14336, 28672):  # the MLP inputs of 8B and 70B models: other sort kernels
        perm = torch.argsort(
            torch.rand(width, device=device, generator=gen), descending=True, stable=True
        )
        torch.argsort(perm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CHILD = (
    "import sys, json, torch; from gptq_worker.quant.solve_triton import warm_up; "
    "from gptq_worker.pipeline.norms import warm_up as warm_up_norms; "
    "device = torch.device(sys.argv[1]); find, norms = json.loads(sys.argv[2]); "
    "warm_up(device, None if find is None else tuple(find)); "
    "norms is None or warm_up_norms(device, norms[0], getattr(torch, norms[1]))"
)


def _child_argv(
    device: torch.device,
    find: tuple[int, bool, bool] | None = None,
    norms: tuple[int, torch.dtype] | None = None,
) -> list[str]:
    dtype = None if norms is None else str(norms[1]).removeprefix("torch.")
    what = [find, None if norms is None else [norms[0], dtype]]
    return [sys.executable, "-c", _CHILD, str(device), json.dumps(what)]


def _start_child(
    device: torch.device,
    find: tuple[int, bool, bool] | None = None,
    norms: tuple[int, torch.dtype] | None = None,
) -> subprocess.Popen | None:
    """Start compiling the Triton kernels in a child process, into Triton's on-disk cache.

    Compiling in this process, on a thread, competes for the interpreter's lock with the
    imports and the model's opening beside it: profiles of the command on an H200 showed
    about 4 s in torch's operator registration while transformers was imported, as long as
    the compile took, which is what a thread waiting for the lock looks like (not
    measured apart from the other startup changes: bench/README.md, third session). A child
    has its own interpreter. If it fails (no writable cache, no CUDA there), the caller
    compiles in this process as before."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # find this gptq_worker
    try:
        return subprocess.Popen(
            # imported by its name: Triton's cache key includes the kernel's module
            _child_argv(device, find, norms),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None


def _wait_child(child: subprocess.Popen, timeout: float = 120.0) -> None:
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _compile_in_child(
    device: torch.device,
    find: tuple[int, bool, bool] | None = None,
    norms: tuple[int, torch.dtype] | None = None,
    timeout: float = 120.0,
) -> None:
    """:func:`_start_child`, waited for."""
    child = _start_child(device, find, norms)
    if child is not None:
        _wait_child(child, timeout)


def quantize_layers(
    model: nn.Module,
    arch: Architecture,
    cfg: QuantizeConfig,
    settings: dict[str, ModuleSettings],
    acts: Activations,
    device: torch.device,
    state: WorkState,
    progress: Progress,
    on_layer: Callable[[int], None] | None = None,
    evaluation: EvalStreams | None = None,
    options: EngineOptions | None = None,
    source: StreamedLayers | None = None,
    on_released: Callable[[int], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> Mapping[str, torch.Tensor]:
    """Quantize every decoder layer (and lm_head if asked); returns all packed tensors.

    ``ready`` is called once, before the first solve (:meth:`WarmUp.wait`).

    ``on_released(i)`` is called (from the mover's thread on a GPU) once layer ``i`` is
    saved and off the device, without waiting for it as ``on_layer`` does.

    ``settings`` comes from :func:`plan`. Layers already in ``state`` are restored and replayed.
    With ``source`` the layers are read from disk as they are needed, and the packed tensors
    are not kept in memory: the result reads them from ``state``'s files when asked.
    """
    options = options or EngineOptions()
    mover = LayerMover(device, source)
    unfuse: list[Callable[[], None]] = []  # the fused norms of the layer being computed
    try:
        packed = _quantize_layers(
            model, arch, cfg, settings, acts, device, state, progress, on_layer, evaluation,
            options, mover, on_released, unfuse, _Once(ready),
        )  # fmt: skip
        return packed if source is None else state.packed()
    finally:
        for restore in unfuse:  # a failed layer's modules as they were
            restore()
        try:
            mover.drain()
        finally:
            mover.close()


def _quantize_layers(
    model, arch, cfg, settings, acts, device, state, progress, on_layer, evaluation, options, mover,
    on_released=None, unfuse=None, ready=None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    ready = ready or _Once(None)
    unfuse = [] if unfuse is None else unfuse
    phases = Phases(device, options.profile)
    fmt = cfg.checkpoint_format
    layers = model.get_submodule(arch.layers)
    packed: dict[str, torch.Tensor] = {}
    # GPTAQ: the full-precision stream, layer 0's inputs being the same for both streams
    gptaq = cfg.gptaq and cfg.method != Method.RTN
    fp_stream = FullPrecisionStream(acts.hidden, acts) if gptaq else None
    # the layer cut between attention and MLP (split.py), once checked on the first layer
    # this run computes; None: layers run whole
    split: LayerSplit | None = LayerSplit.for_model(model) if cfg.true_sequential else None
    split_checked = split is None
    # None: not checked yet (split.py: the first layer that replays checks it)
    replay_ok: bool | None = None if options.replay_attention else False
    replay_memory_said = False
    fetched = mover.fetch(layers[0], 0)
    for i, layer in enumerate(layers):
        prefix = f"{arch.layers}.{i}"
        names = {n: f"{prefix}.{n}" for g in arch.groups for n in g}
        with phases("move"):
            mover.ready(fetched, layer)
        if options.fused_norms:
            unfuse.append(fuse_norms(layer))
        if i + 1 < len(layers):
            fetched = mover.fetch(layers[i + 1], i + 1)  # copied in while this is computed
        if evaluation is not None:  # original weights: the "before" stream
            evaluation.before_layer(layer, i)
        resumed = i < state.layers_done
        passes = [[g] for g in arch.groups] if cfg.true_sequential else [list(arch.groups)]
        passes = [[[n for n in g if names[n] in settings] for g in groups] for groups in passes]
        passes = [[g for g in groups if g] for groups in passes]
        passes = [] if resumed else [groups for groups in passes if groups]
        if passes and not split_checked:
            split_checked = True
            with phases("forward"):
                if not split.reproduces(layer, acts, i):
                    split = None
            if fp_stream is not None:
                fp_stream.split = split
        q_at_mid = False  # acts.hidden holds this layer's h_mid (split.py)
        fp_to_mid_pass = -1
        if split is not None and passes:
            # the full-precision stream moves to h_mid in the pass of the last attention group
            fp_to_mid_pass = max(
                (
                    p
                    for p, groups in enumerate(passes)
                    if any(split.in_attention(n) for g in groups for n in g)
                ),
                default=0,
            )
        if fp_stream is not None:  # the layer still has its original weights
            fp_stream.begin(layer, i, copy_weights=bool(passes))
            if resumed:
                with phases("forward"):
                    fp_stream.advance()
        losses: dict[str, dict[str, float]] = {}
        layer_packed: dict[str, torch.Tensor] = {}
        if resumed:
            layer_packed = state.load_layer(i)
            for short, full in names.items():
                if full in settings:
                    restore_weight(
                        layer.get_submodule(short), full, layer_packed, settings[full].bits, fmt
                    )
        else:
            kept: list[torch.Tensor | None] | None = None  # o_proj's inputs, per batch
            for p, groups in enumerate(passes):
                # the partly quantized stream moves to h_mid in the first pass with no
                # attention group: every attention group before it is quantized by now
                q_to_mid = (
                    split is not None
                    and not q_at_mid
                    and not any(split.in_attention(n) for g in groups for n in g)
                )
                replay = (
                    kept
                    if q_to_mid and kept and len(kept) == len(acts.hidden) and kept[0] is not None
                    else None
                )
                kept = None
                if replay is not None and replay_ok is None:
                    with phases("forward"):
                        replay_ok = split.replays(
                            layer, acts.hidden[0], acts.args[i][0], acts.kwargs[i][0], replay[0]
                        )
                    if not replay_ok:
                        log.info("the attention half is computed in every pass (no replay)")
                if not replay_ok:
                    replay = None
                keep = None
                if (
                    replay_ok is not False
                    and cfg.method != Method.RTN
                    and split is not None
                    and split.output is not None
                    and not q_at_mid
                    and groups == [[split.output]]
                    and p + 1 < len(passes)
                    and not any(split.in_attention(n) for g in passes[p + 1] for n in g)
                ):  # the next pass moves the stream to h_mid: replayed from these
                    module = layer.get_submodule(split.output)
                    keep = (split.output, [], _batches_to_keep(device, acts, module))
                    if keep[2] < len(acts.hidden) and not replay_memory_said:
                        replay_memory_said = True
                        log.info(
                            "o_proj's inputs kept for %d of %d batches (the GPU's free "
                            "memory); the others' attention half is computed again",
                            keep[2], len(acts.hidden),
                        )  # fmt: skip
                hessians = (
                    {}
                    if cfg.method == Method.RTN
                    else collect_hessians(
                        layer,
                        groups,
                        acts,
                        i,
                        device,
                        options.hessian_precision,
                        phases,
                        fp_stream,
                        complete=p == len(passes) - 1,
                        split=split,
                        at_mid=q_at_mid,
                        to_mid=q_to_mid,
                        fp_to_mid=p == fp_to_mid_pass,
                        keep=keep,
                        replay=replay,
                    )
                )
                kept = None if keep is None else keep[1]
                del replay, keep
                q_at_mid = q_at_mid or (q_to_mid and cfg.method != Method.RTN)
                for group in groups:
                    H, dXXT = hessians.get(group[0], (None, None))
                    ready()
                    with phases("solve"):
                        results = _solve_group(layer, group, names, H, settings, cfg, options, dXXT)
                    for short, q in results.items():
                        full = names[short]
                        set_weight_matrix(layer.get_submodule(short), q.weight)
                        with phases("pack"):
                            layer_packed.update(packed_tensors(full, q, settings[full].bits, fmt))
                        losses[full] = {"loss": round(q.loss, 6), "damp": round(q.damp, 6)}
                    del results, H, dXXT
                del hessians
        with phases("forward"):
            if fp_stream is not None:
                fp_stream.end()  # the full-precision stream moves on, if no pass moved it
            if q_at_mid:
                _forward_mlp_half_in_place(layer, acts, i, split)
            else:
                forward_layer_in_place(layer, acts.hidden, acts, i)
        if evaluation is not None:
            evaluation.after_layer(layer, i)
        while unfuse:  # the layer's modules as the caller gave them
            unfuse.pop()()

        quantized = {full for full in names.values() if full in settings}

        def finish(
            i=i, layer=layer, layer_packed=layer_packed, losses=losses, resumed=resumed,
            quantized=quantized,
        ):  # fmt: skip
            mover.release(layer, i, quantized)
            on_cpu = _to_cpu(layer_packed)
            mover.synchronize()  # what release copied out is on the host now
            if not resumed:
                state.save_layer(i, on_cpu, losses)
            if mover.source is None:  # streaming: read back from the work directory
                # kept to the end: out of the pinned buffers into ordinary memory
                packed.update({k: _unpinned(v) for k, v in on_cpu.items()})
            if on_released is not None:
                on_released(i)

        mover.retire(finish)  # copied out and saved while the next layer is computed
        if on_layer is not None or not mover.cuda:
            mover.drain()  # callers that watch each layer see it saved
        timing = phases.take() if options.profile else None
        progress.layer_done(i, losses or _saved_losses(state, names), resumed, timing)
        if on_layer is not None:
            on_layer(i)
    mover.drain()
    if evaluation is not None:  # before lm_head is quantized
        evaluation.ppl_before = evaluation.perplexity(model, arch, device, evaluation.before)
    if cfg.lm_head and arch.lm_head in settings:
        ready()
        packed.update(
            _quantize_lm_head(
                model, arch, cfg, settings[arch.lm_head], acts, device, state, len(layers), options
            )
        )
    if evaluation is not None:
        evaluation.ppl_after = evaluation.perplexity(model, arch, device, evaluation.after)
    return packed


def _batches_to_keep(device: torch.device, acts: Activations, module: nn.Module) -> int:
    """How many of the first batches may keep ``module``'s inputs for the replay: on a GPU,
    as many as its free memory holds beyond a margin (the larger of 2 GiB and a tenth of
    the device), since a large calibration set makes them large (2 GiB for 128 x 2048
    tokens of an 8B model); elsewhere all. The checkpoint does not depend on it: a batch
    not kept is computed, to the same bits."""
    if device.type != "cuda":
        return len(acts.hidden)
    in_features, _ = features(module)
    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget -= max(2 << 30, total // 10)
    n = 0
    for h in acts.hidden:
        size = h.numel() // h.shape[-1] * in_features * h.element_size()
        if size > budget:
            break
        budget -= size
        n += 1
    return n


class _Once:
    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


@torch.no_grad()
def _forward_mlp_half_in_place(
    layer: nn.Module, acts: Activations, index: int, split: LayerSplit
) -> None:
    """:func:`forward_layer_in_place` for a stream that holds the layer's ``h_mid``."""
    for b, h in enumerate(acts.hidden):
        out = forward_from(layer, h, acts.args[index][b], acts.kwargs[index][b], split, True)
        acts.hidden[b] = layer_output(out)


def _saved_losses(state: WorkState, names: dict[str, str]) -> dict[str, dict[str, float]]:
    return {full: state.losses[full] for full in names.values() if full in state.losses}


def _quantize_lm_head(
    model: nn.Module,
    arch: Architecture,
    cfg: QuantizeConfig,
    s: ModuleSettings,
    acts: Activations,
    device: torch.device,
    state: WorkState,
    index: int,
    options: EngineOptions,
) -> dict[str, torch.Tensor]:
    head = model.get_submodule(arch.lm_head)
    if getattr(model.config, "tie_word_embeddings", False):  # quantized head cannot stay tied
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if state.layers_done > index:
        tensors = state.load_layer(index)
        restore_weight(head, arch.lm_head, tensors, s.bits, cfg.checkpoint_format)
        return tensors
    norm = model.get_submodule(arch.final_norm).to(device)
    head.to(device)
    H = None
    if cfg.method != Method.RTN:
        in_features, _ = features(head)
        acc = Hessian(in_features, device, options.hessian_precision)
        for h in acts.hidden:
            acc.add(norm(h))
        H = acc.result()
    q = _solve(weight_matrix(head), H, s, cfg, options.solver)
    set_weight_matrix(head, q.weight)
    tensors = packed_tensors(arch.lm_head, q, s.bits, cfg.checkpoint_format)
    norm.to("cpu")
    head.to("cpu")
    state.save_layer(
        index, tensors, {arch.lm_head: {"loss": round(q.loss, 6), "damp": round(q.damp, 6)}}
    )
    return tensors
