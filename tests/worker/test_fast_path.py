"""Equality guard: the fast engine path writes what the straightforward one writes.

Straightforward: one calibration sample per forward, fp32 Hessians with the running
rescale, one solve per module, the Python column loop. Fast: batched forwards, Hessians
summed then scaled once (tensor cores on a GPU), modules that share a Hessian stacked into
one solve, and the Triton block kernel (run here by Triton's CPU interpreter).

Documented tie case: a batched matrix product may round an activation differently from a
per-sample one (it depends on the CPU's BLAS kernels). Where a value then sits on a
rounding boundary its code flips by one, and GPTQ's error feedback carries that into later
columns. So both paths get the same batches and must write the same bits, and a separate
test shows that batched forwards equal per-sample ones to fp32 precision.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptq_compat.config import QuantizeConfig
from gptq_worker.arch import architecture_for
from gptq_worker.demo.models import tiny_model
from gptq_worker.pipeline.capture import capture_inputs, forward_layer
from gptq_worker.pipeline.driver import EngineOptions, quantize_layers
from gptq_worker.pipeline.plan import plan
from gptq_worker.pipeline.state import WorkState
from gptq_worker.progress.events import Progress
from gptq_worker.quant.gptq import gptq_quantize
from gptq_worker.quant.hessian import Hessian, accumulate_hessian

STRAIGHT = EngineOptions(hessian_precision="fp32", solver="torch", fuse=False, profile=False)
FAST = EngineOptions(profile=False)


@pytest.fixture(scope="module")
def calibration_ids(tokenizer, corpus) -> torch.Tensor:
    ids = tokenizer(corpus[:200_000]).input_ids
    return torch.tensor(ids[: 16 * 64]).view(16, 64)


def run_engine(tmp_path, tokenizer, ids, model_type, batch, options, **quantization):
    model = tiny_model(model_type, len(tokenizer), hidden=128, layers=2, intermediate=256)
    arch = architecture_for(model)
    cfg = QuantizeConfig(**quantization)
    acts = capture_inputs(model, arch, list(ids.split(batch)), torch.device("cpu"))
    state = WorkState(tmp_path / f"state-{model_type}-{batch}-{id(options)}", "test")
    state.open()
    return quantize_layers(
        model,
        arch,
        cfg,
        plan(model, arch, cfg),
        acts,
        torch.device("cpu"),
        state,
        Progress(None, 2, show_bar=False),
        options=options,
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "quantization",
    [
        {"bits": 4, "group_size": 32},
        {"bits": 3, "group_size": 64, "desc_act": True, "sym": False},
        {"bits": 4, "group_size": 32, "desc_act": True, "static_groups": True},
        {"bits": 3, "group_size": 32, "sym": False, "gptaq": True, "mse": 2.4},
    ],
    ids=["w4g32", "w3g64-act-asym", "w4g32-act-static", "w3g32-gptaq-mse"],
)
def test_fast_engine_writes_the_same_checkpoint(
    tmp_path, tokenizer, calibration_ids, model_type, quantization
):
    """Same batches of calibration samples in: the same bits out."""
    straight = run_engine(
        tmp_path, tokenizer, calibration_ids, model_type, 4, STRAIGHT, **quantization
    )
    fast = run_engine(tmp_path, tokenizer, calibration_ids, model_type, 4, FAST, **quantization)
    assert straight.keys() == fast.keys()
    for key in straight:
        assert torch.equal(straight[key], fast[key]), key


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_batched_forwards_equal_per_sample_forwards(tokenizer, calibration_ids, model_type):
    """Batching changes only the rounding of the matrix products (the tie case above): each
    decoder layer's output for a batch of 4 equals its per-sample outputs to fp32 precision."""
    model = tiny_model(model_type, len(tokenizer), hidden=128, layers=2, intermediate=256)
    arch = architecture_for(model)
    cpu = torch.device("cpu")
    one = capture_inputs(model, arch, list(calibration_ids.split(1)), cpu)
    four = capture_inputs(model, arch, list(calibration_ids.split(4)), cpu)
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        one.hidden = forward_layer(layer, one, i)
        four.hidden = forward_layer(layer, four, i)
        torch.testing.assert_close(torch.cat(four.hidden), torch.cat(one.hidden))


def test_fused_solve_equals_one_solve_per_module():
    """q/k/v stacked into one matrix: rows are independent given H, so results are equal."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 4
    H = 2 / 2048 * x.t() @ x
    parts = [torch.randn(n, 256, generator=g) for n in (256, 64, 64)]
    kw = {"bits": 4, "group_size": 64, "sym": True, "desc_act": True, "solver": "torch"}
    fused = gptq_quantize(torch.cat(parts), H, **kw)
    start = 0
    for w in parts:
        alone = gptq_quantize(w, H, **kw)
        part = fused.rows(start, start + w.shape[0])
        start += w.shape[0]
        for field in ("codes", "scales", "zeros", "g_idx", "weight", "row_losses"):
            assert torch.equal(getattr(part, field), getattr(alone, field)), field


def test_hessian_summed_then_scaled_equals_the_running_rescale():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 64, 96, generator=g).half() for _ in range(5)]
    acc = Hessian(96, torch.device("cpu"), "tensor-core")  # no tensor cores on a CPU: fp32
    H, n = torch.zeros(96, 96), 0
    for b in batches:
        acc.add(b)
        H, n = accumulate_hessian(H, n, b)
    assert acc.count == n == 20
    # the same sums in another order: equal to fp32 rounding of the largest entries
    torch.testing.assert_close(acc.result(), H, rtol=1e-5, atol=1e-6 * float(H.abs().max()))


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from gptq_worker.quant.gptq import gptq_quantize

    cases = [
        (64, 256, 32, False, False, 4, True),
        (48, 192, 64, True, False, 3, False),
        (32, 384, 128, True, True, 4, True),
        (40, 200, -1, False, False, 2, False),  # a last block narrower than 128
        (16, 512, 256, False, False, 8, True),  # groups spanning two blocks
        (24, 1152, 128, True, True, 4, True),  # two panels of 8 blocks (act-order)
        (24, 1152, 64, False, False, 3, False),  # two panels, groups found in the kernel
    ]
    g = torch.Generator().manual_seed(0)
    for out, n, gs, act, static, bits, sym in cases:
        W = torch.randn(out, n, generator=g)
        X = torch.randn(512, n, generator=g) * torch.rand(n, generator=g) * 3
        H = X.t() @ X * 2 / 512
        kw = dict(bits=bits, group_size=gs, sym=sym, desc_act=act, static_groups=static)
        a = gptq_quantize(W, H, solver="torch", **kw)
        b = gptq_quantize(W, H, solver="triton", **kw)
        for f in ("codes", "scales", "zeros", "g_idx", "weight", "row_losses"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (out, n, gs, f)
        # GPTAQ's correction inside the kernel: a second stream that differs
        Xq = X + 0.3 * torch.randn(512, n, generator=g) * X.abs().mean(0)
        H = Xq.t() @ Xq * 2 / 512
        D = (X - Xq).t() @ Xq * 2 / 512
        a = gptq_quantize(W, H, solver="torch", dXXT=D, **kw)
        b = gptq_quantize(W, H, solver="triton", dXXT=D, **kw)
        for f in ("codes", "scales", "zeros", "g_idx", "weight", "row_losses"):
            assert torch.equal(getattr(a, f), getattr(b, f)), ("gptaq", out, n, gs, f)
    print("triton solve equal")
    """
)


def test_triton_block_kernel_gives_the_torch_loops_bits():
    """The kernel the GPU runs, executed by Triton's interpreter on the CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("triton is not installed (it comes with torch on Linux x86-64)")
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "triton solve equal" in done.stdout


def test_hessian_lower_blocks_equal_the_whole_product(monkeypatch):
    """From ``SYMMETRIC_FROM`` on, only the blocks on and below the diagonal are multiplied
    and the rest mirrored: the same Hessian (and cross term), exactly symmetric."""
    from gptq_worker.quant.hessian import AsymmetricHessian, symmetric_blocks

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 32, 768, generator=g) for _ in range(3)]
    fp = [b + 0.01 * torch.randn(b.shape, generator=g) for b in batches]
    whole = AsymmetricHessian(768, torch.device("cpu"), "fp32")
    monkeypatch.setattr(Hessian, "SYMMETRIC_FROM", 256)
    blocked = AsymmetricHessian(768, torch.device("cpu"), "fp32")
    assert len(blocked.blocks) == 2 and whole.blocks == [slice(None)]
    for b, f in zip(batches, fp, strict=True):
        whole.add_pair(b, f)
        blocked.add_pair(b, f)
    H, Hw = blocked.result(), whole.result()
    assert torch.equal(H, H.t())
    torch.testing.assert_close(H, Hw, rtol=1e-5, atol=1e-6 * float(Hw.abs().max()))
    torch.testing.assert_close(blocked.cross_result(), whole.cross_result())
    assert [(s.start, s.stop) for s in symmetric_blocks(14336)] == [
        (k * 3584, (k + 1) * 3584) for k in range(4)
    ]
    assert len(symmetric_blocks(28672)) == 7 and symmetric_blocks(1000) == [slice(None)]


def test_lower_inverse_by_halves_equals_the_solve_against_the_identity():
    from gptq_worker.quant.gptq import lower_inverse

    g = torch.Generator().manual_seed(0)
    for n in (5, 300, 700):
        X = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
        L = torch.linalg.cholesky(X.t() @ X / n + torch.eye(n, dtype=torch.float64)).float()
        got = lower_inverse(L, leaf=128)
        ref = torch.linalg.inv(L.double())
        assert torch.equal(got.triu(1), torch.zeros_like(got.triu(1)))
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-6


def test_the_solver_finds_groups_only_where_a_block_holds_them():
    """Which runs compile the kernel's group-finding variant at start-up."""
    from gptq_worker.pipeline.driver import solver_finds_groups

    assert solver_finds_groups(QuantizeConfig()) is None  # static groups by default
    plain = dict(desc_act=False, static_groups=False, gptaq=False)
    assert solver_finds_groups(QuantizeConfig(**plain)) == (128, True, False)
    assert solver_finds_groups(QuantizeConfig(**plain, group_size=32, sym=False)) == (
        32, False, False,
    )  # fmt: skip
    assert solver_finds_groups(QuantizeConfig(**plain, group_size=256)) is None  # spans blocks
    assert solver_finds_groups(QuantizeConfig(**plain, group_size=-1)) is None
    assert solver_finds_groups(QuantizeConfig(**plain, mse=2.4)) is None  # grid search
    assert solver_finds_groups(QuantizeConfig(**plain, method="rtn")) is None


@pytest.mark.parametrize(
    "settings",
    [{}, {"desc_act": False, "static_groups": False, "gptaq": False}, {"method": "rtn"},
     {"bits": 3, "sym": False, "group_size": 64, "checkpoint_format": "gptq"}],
    ids=["default", "plain", "rtn", "w3-asym-v1"],
)  # fmt: skip
def test_the_warm_up_rehearsal_runs_with_each_kind_of_settings(settings):
    """The solve and packing the warm-up rehearses (to load the GPU's kernels before the
    first layer) run with the run's own settings; on a CPU, through the torch loop."""
    from gptq_worker.pipeline.driver import rehearse

    rehearse(torch.device("cpu"), QuantizeConfig(**settings), EngineOptions(solver="torch"))


@pytest.mark.parametrize("lm_head", [False, True])
def test_the_warm_up_is_waited_for_once_before_the_first_solve(
    tmp_path, monkeypatch, tokenizer, calibration_ids, lm_head
):
    """The engine needs the warm-up (the solver's kernels, on a GPU) at its first solve, not
    at its first layer: the layer's move and first forwards overlap what is left of it.
    ``ready`` is called once, before any solve (lm_head's included), and never again."""
    from gptq_worker.pipeline import driver

    events: list[str] = []
    solve_group = driver._solve_group

    def solve(*args, **kwargs):
        events.append("solve")
        return solve_group(*args, **kwargs)

    monkeypatch.setattr(driver, "_solve_group", solve)
    model = tiny_model("llama", len(tokenizer), hidden=128, layers=2, intermediate=256)
    arch = architecture_for(model)
    cfg = QuantizeConfig(bits=4, group_size=32, lm_head=lm_head)
    acts = capture_inputs(model, arch, list(calibration_ids.split(4)), torch.device("cpu"))
    state = WorkState(tmp_path / "state", "test")
    state.open()
    quantize_layers(
        model, arch, cfg, plan(model, arch, cfg), acts, torch.device("cpu"), state,
        Progress(None, 2, show_bar=False), options=FAST, ready=lambda: events.append("ready"),
    )  # fmt: skip
    assert events[0] == "ready" and events.count("ready") == 1
    assert events.count("solve") == 2 * 4  # four groups per layer (lm_head: _solve)
