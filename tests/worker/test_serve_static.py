"""The fast runtime's pieces on a CPU: the GPTQ kernels' index arithmetic (in torch, and the
Triton kernels themselves through Triton's interpreter) against ``pack.dequantize_packed``,
and the static-cache runtime's tokens against plain greedy decoding of the dequantized
model (the GPU adds only the Triton kernels, checked here, and CUDA graphs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_compat.config import CheckpointFormat
from gptq_worker.kernels import gptq_triton as kernels
from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.generate import Engine, Sampling
from gptq_worker.serve.model import load_quantized_model
from gptq_worker.serve.static import StaticBatch, length_buckets, unsupported

from .conftest import worker_config
from .kernel_cases import FORMATS, layer
from .test_serve import dense_copy, greedy
from .test_serve_batching import PROMPTS, Collected


def _interpreted(check: str, *args: str, timeout: int = 900) -> str:
    """Run a check script under Triton's CPU interpreter in a child process (the variable
    must be set before Triton is imported); returns its stdout after asserting success."""
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", check, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=here,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize(("bits", "sym", "act", "fmt"), FORMATS)
def test_kernel_index_arithmetic_reads_what_pack_wrote(bits, sym, act, fmt):
    w, expected = layer(bits, sym, act, fmt, seed=bits)
    assert (w.group == 0) == act  # act-order gathers per k; plain groups read one row
    torch.testing.assert_close(kernels.reference_weight(w), expected.t(), rtol=0, atol=0)
    x = torch.randn(3, w.in_features)
    torch.testing.assert_close(
        kernels.reference_matmul(x, w), x @ expected.t(), rtol=1e-5, atol=1e-5
    )


def test_a_wrong_bit_width_is_caught():
    """The comparison above can fail: the same words read at another width differ."""
    w, expected = layer(4, False, False, CheckpointFormat.GPTQ)
    w.bits = 2
    w.in_features = 512
    w.g_idx = torch.arange(512, dtype=torch.int32) // 128
    assert not torch.equal(kernels.reference_weight(w)[:256], expected.t())


def test_plain_group_recognises_only_k_over_group_size():
    assert kernels.plain_group(torch.arange(256) // 64, 4) == 64
    assert kernels.plain_group(torch.zeros(256, dtype=torch.int32), 1) == 256
    swapped = torch.arange(256) // 64
    swapped[[0, 255]] = swapped[[255, 0]]
    assert kernels.plain_group(swapped, 4) == 0


TRITON_CHECK = r"""
import torch
from gptq_worker.kernels import gptq_triton as kernels
from kernel_cases import FORMATS, layer

bad = []
paths = set()
for i, (bits, sym, act, fmt) in enumerate(FORMATS):
    # group 32: tiles of 32 rows; group 128 (k not a multiple of the tile): 4/8-bit planes
    for k, group in ((288, 32), (640, 128)):
        w, expected = layer(bits, sym, act, fmt, k=k, n=96, group=group, seed=i)
        ref = expected.t()
        assert torch.equal(kernels.dequantize(w, torch.float32), ref), ("dequantize", bits, act)
        for m in (1, 5, 40):
            x = torch.randn(m, w.in_features)
            for kind in ("mv", "mm") if m == 1 else ("mm",):
                for config in ((32, 0), (64, 4), (128, 8)):  # no K split; split, atomics
                    y = kernels.fused_matmul(x, w, config, kind)
                    err = ((y - x @ ref).norm() / (x @ ref).norm()).item()
                    planes = kind == "mm" and bits in (4, 8) and w.block_k * bits // 32 >= 16
                    paths.add((kind, planes, w.group > 0))
                    if not err < 1e-5:
                        bad.append((bits, sym, act, str(fmt), k, m, kind, config, err))
        y = kernels.qmatmul(torch.randn(70, w.in_features), w)  # many rows: dequantize + matmul
        assert y.shape == (70, w.out_features)
        # the tuner's "dq" choice: the same product through the dequantized layer
        x = torch.randn(70, w.in_features)
        y = kernels.fused_matmul(x, w, kind="dq", fp32=True)
        assert y.dtype == torch.float32 and torch.allclose(y, x @ ref, rtol=1e-5, atol=1e-4)
        paths.add(("dq", False, w.group > 0))
assert not bad, bad
assert len(paths) == 8, paths  # mv, mm (with and without planes), dq; grouped and act-order
print("triton kernels equal", len(FORMATS))
"""


def test_triton_kernels_equal_the_dequantized_product():
    """The kernels the GPU runs, executed by Triton's interpreter on the CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("triton is not installed (it comes with torch on Linux x86-64)")
        pytest.skip("triton is not installed")
    assert f"triton kernels equal {len(FORMATS)}" in _interpreted(TRITON_CHECK)


FUSED_STEP_CHECK = r"""
import sys
import torch
from gptq_worker.kernels import decode_triton as fused
from gptq_worker.serve.model import load_quantized_model
from gptq_worker.serve.static import StaticBatch

torch.manual_seed(0)
model = load_quantized_model(sys.argv[1])
batch = StaticBatch(model, torch.device("cpu"), 0, rows=2, capacity=64, graphs=False)
batch.fused = True  # what runs on a GPU, here through Triton's interpreter
check = batch.self_check([3, 17, 42, 9, 250, 11])
print(check)
assert check["decode_step_argmax_equal"] and check["decode_step_vs_torch_rel_err"] < 1e-4, check
batch.fused = False  # the check compares two different paths: the torch one with itself is 0
assert batch.self_check([3, 17, 42, 9, 250, 11])["decode_step_vs_torch_rel_err"] == 0
print("fused step equal")
"""


def test_fused_decode_step_equals_the_torch_step(served_checkpoint):
    """The GPU's decode step (add+norm, GPTQ matmuls, rope+cache write, attention,
    silu*up, all Triton) against the torch step, through Triton's interpreter."""
    pytest.importorskip("triton")
    assert "fused step equal" in _interpreted(FUSED_STEP_CHECK, str(served_checkpoint))


MIXED_STEP_CHECK = r"""
import sys
import torch
from gptq_worker.serve.batch import Row
from gptq_worker.serve.model import load_quantized_model
from gptq_worker.serve.static import StaticBatch

torch.manual_seed(0)
model = load_quantized_model(sys.argv[1])
# p1 is longer than the split attention's 64-column chunk of a 128-column cache: its row
# attends over two chunks joined
p1, p2, p3 = [3, 17, 42, 9, 250, 11] * 12, [5, 6, 7], [99, 100, 101, 102, 103]


def run(fused, mixed):
    b = StaticBatch(model, torch.device("cpu"), 0, rows=3, capacity=128, graphs=False)
    b.fused = fused
    logits, start = b.prefill([p1])
    row = Row(None, None, None, length=len(p1))
    row.token = int(logits[0].argmax())
    b.join([row], start, [0])
    if mixed:
        assert b.mixes([p2, p3])
        dec, new, start = b.mixed([p2, p3])
    else:
        dec = b.decode()
        new, start = b.prefill([p2, p3])
    assert start == 1 and row.length == len(p1) + 1
    return torch.cat([dec, new]).float()


from gptq_worker.kernels import decode_triton

assert decode_triton.split_chunk(128) == 64


reference = run(False, False)  # the eager prefill and the torch decode step
for fused, mixed in ((True, False), (True, True)):
    got = run(fused, mixed)
    rel = ((got - reference).norm() / reference.norm()).item()
    assert rel < 1e-4 and torch.equal(got.argmax(-1), reference.argmax(-1)), (fused, mixed, rel)
print("mixed step equal")
"""


def test_one_fused_step_decodes_rows_and_prefills_prompts(served_checkpoint):
    """The fused step over flat tokens (decoding rows beside new prompts, each token with
    its cache slot and position) gives the logits of a separate prefill and decode step."""
    pytest.importorskip("triton")
    assert "mixed step equal" in _interpreted(MIXED_STEP_CHECK, str(served_checkpoint))


HALF_CHECK = r"""
import torch
from gptq_worker.kernels import gptq_triton as kernels
from kernel_cases import FORMATS, layer

swapped = set()
for i, (bits, sym, act, fmt) in enumerate(FORMATS[::2]):
    for k, group in ((288, 32), (640, 128), (512, 64)):
        w, expected = layer(bits, sym, act, fmt, k=k, n=96, group=group, seed=i)
        assert w.half
        rows = torch.tensor([0, 1, 7, 31, 100, k - 1])
        x = torch.zeros(len(rows), k, dtype=torch.float16)
        x[torch.arange(len(rows)), rows] = 1  # one-hot rows: y is those rows of W, exactly
        # no K split; split; 16-row tiles with x in the planes' order (4/8 bits, k=640)
        for config in ((32, 0), (64, 4), (64, 2, 2, 4, 16, 1)):
            y = kernels.fused_matmul(x, w, config, "mm")
            assert torch.equal(y, expected.t()[rows].half()), (bits, sym, act, k, config)
        # the swapped-operand tiles (4/8 bits, plain groups): no K split, split (atomics),
        # x in the planes' order or not, K tiles of one group or of several
        for config in ((64, 0, 2, 4, 0, 1, 128), (32, 4, 2, 4, 0, 0, 128),
                       (32, 4, 2, 4, 16, 1, 64), (64, 1, 2, 4, 0, 1, 256)):  # fmt: skip
            if not kernels.swapped_applies(w, config[-1]):
                continue
            y = kernels.fused_matmul(x, w, config, "mt")
            assert torch.equal(y, expected.t()[rows].half()), (bits, sym, act, k, config)
            x40 = torch.randn(40, k, dtype=torch.float16)  # two tiles of 32 rows
            y = kernels.fused_matmul(x40, w, config, "mt", fp32=True)
            ref = x40.float() @ expected.t().half().float()
            assert ((y - ref).norm() / ref.norm()).item() < 1e-3, (bits, sym, k, config)
            swapped.add((bits, k, config))
assert len(swapped) >= 8, swapped
print("fp16 dequantization exact")
"""


def test_swapped_kernel_takes_only_the_layers_it_can_read():
    """4/8-bit plain groups with fp16 scales and K a whole number of tiles; act-order,
    2/3 bits and tiles a group would straddle go to the other kernels."""
    w, _ = layer(4, True, False, CheckpointFormat.GPTQ, k=512, group=128)
    assert kernels.swapped_applies(w, 128) and kernels.swapped_applies(w, 256)
    assert not kernels.swapped_applies(w, 384)  # 512 is not a whole number of 384s
    w64, _ = layer(4, True, False, CheckpointFormat.GPTQ, k=512, group=64)
    assert kernels.swapped_applies(w64, 128)  # each word's 8 values lie in one group
    for bits, act in ((4, True), (3, False), (2, False)):
        other, _ = layer(bits, True, act, CheckpointFormat.GPTQ, k=512, group=128)
        assert not kernels.swapped_applies(other, 128), (bits, act)
    with pytest.raises(ValueError, match="swapped kernel"):
        kernels.fused_matmul(torch.randn(2, 512), w, (64, 2, 3, 4, 0, 1, 128), "mt")


def test_fp16_dequantization_is_the_reference_rounding():
    """fp16 activations take the kernel's fp16 dequantization (no int-to-float
    conversions): each weight is bit for bit the reference's fp32 value rounded to fp16."""
    pytest.importorskip("triton")
    assert "fp16 dequantization exact" in _interpreted(HALF_CHECK)


DECODE_KERNELS_CHECK = r"""
import torch
from gptq_worker.kernels import decode_triton as D

torch.manual_seed(0)
rows, H, KV, hd, S, N, I = 3, 8, 2, 64, 200, 96, 80
h = torch.randn(rows, N)
d = torch.randn(rows, N)
w = torch.randn(N)
for delta in (d, None):
    ref_h, ref_x = D.add_rms_reference(h, delta, w, 1e-5)
    x, h2 = torch.empty_like(h), h.clone()
    D.add_rms(h2, delta, w, 1e-5, x)
    assert torch.allclose(h2, ref_h, atol=1e-6) and torch.allclose(x, ref_x, atol=1e-5)
qkv = torch.randn(rows, (H + 2 * KV) * hd)
pos = torch.tensor([5, 0, 150])  # rows at different positions, one at the very start
inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
emb = torch.arange(S)[:, None].float() * inv[None]
emb = torch.cat([emb, emb], -1)
cos, sin = emb.cos(), emb.sin()
keys, values = torch.randn(rows, KV, S, hd), torch.randn(rows, KV, S, hd)
q = torch.empty(rows, H, hd)
D.rope_kv(qkv, q, keys, values, cos, sin, pos, H, KV)
rq, rk, rv = D.rope_kv_reference(qkv, cos, sin, pos, H, KV, hd)
ar = torch.arange(rows)
assert torch.allclose(q, rq, atol=1e-5)
assert torch.allclose(keys[ar, :, pos], rk, atol=1e-5)
assert torch.equal(values[ar, :, pos], rv)
import os
assert D.split_chunk(S) == 64  # a 200-column cache: 4 chunks
for split in ("1", "0"):  # context split across programs and joined; one program per head
    os.environ["GPTQ_SERVE_SPLIT_ATTENTION"] = split
    out = torch.empty(rows, H * hd)
    D.attention(q, keys, values, pos, out, hd**-0.5)
    want = D.attention_reference(q, keys, values, pos, hd**-0.5)
    assert torch.allclose(out, want, atol=1e-5), split
os.environ["GPTQ_SERVE_SPLIT_ATTENTION"] = "1"
# positions at and around chunk boundaries, the last column, slots other than the rows
pos2 = torch.tensor([63, 64, 127, 128, 199, 1])
q2 = torch.randn(len(pos2), H, hd)
slots = torch.tensor([2, 0, 1, 2, 0, 1])
out = torch.empty(len(pos2), H * hd)
D.attention(q2, keys, values, pos2, out, hd**-0.5, slots)
want = D.attention_reference(q2, keys, values, pos2, hd**-0.5, slots)
assert torch.allclose(out, want, atol=1e-5)
assert D.split_chunk(64) == 0 and D.split_chunk(8192) == 256  # one chunk; at most 32
gu = torch.randn(rows, 2 * I)
o = torch.empty(rows, I)
D.silu_mul(gu, o)
assert torch.allclose(o, D.silu_mul_reference(gu), atol=1e-6)
print("decode kernels equal")
"""


def test_decode_kernels_equal_their_torch_references():
    pytest.importorskip("triton")
    assert "decode kernels equal" in _interpreted(DECODE_KERNELS_CHECK, timeout=600)


def test_length_buckets_cover_the_capacity():
    assert length_buckets(2048) == [256, 512, 768, 1024, 1536, 2048]
    assert length_buckets(100) == [100]
    b = length_buckets(8192)
    assert b[-1] == 8192 and b == sorted(set(b)) and all(x % 256 == 0 for x in b)


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory, model_dir, calibration_file):
    """3-bit, asymmetric, act-order (real g_idx): what only the built-in runtime serves."""
    out = tmp_path_factory.mktemp("static") / "w3g32-asym-act"
    quantize(
        worker_config(
            model_dir("llama"), out, calibration_file, bits=3, group_size=32, sym=False,
            desc_act=True,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tok(served_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_checkpoint)


def test_static_prefill_logits_equal_the_transformers_forward(served_checkpoint, tok):
    model = load_quantized_model(served_checkpoint)
    assert unsupported(model) is None
    prompts = [tok(t).input_ids for t in PROMPTS[:3]]
    batch = StaticBatch(model, torch.device("cpu"), 0, rows=4, capacity=128)
    logits, start = batch.prefill(prompts)
    assert start == 0
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["w4g32", "w3g32-asym-act"])
def test_static_runtime_gives_the_greedy_tokens_of_the_dequantized_model(
    which, served_checkpoint, odd_checkpoint, tok
):
    """Staggered arrivals, more requests than rows (rows leave from the middle and the last
    one moves into the freed slot): each request gets plain greedy decoding's tokens."""
    checkpoint = served_checkpoint if which == "w4g32" else odd_checkpoint
    served = load_quantized_model(checkpoint)
    dense = dense_copy(load_quantized_model(checkpoint))
    engine = Engine(served, tok, torch.device("cpu"), max_batch=3, runtime="static")
    assert engine.runtime == "static"
    moves = []
    batch = engine._batch
    original_move = batch._move
    batch._move = lambda *a: (moves.append(a), original_move(*a))
    jobs = []
    try:
        for i, text in enumerate(PROMPTS):
            sampling = Sampling(max_tokens=14 - 2 * i, temperature=0, ignore_eos=True)
            job = Collected(tok(text).input_ids, sampling)
            engine.submit(job.request)
            jobs.append(job)
            if i < 2:
                assert job.first.wait(60)  # the next one joins while this one decodes
        for job in jobs:
            assert job.done.wait(120)
    finally:
        engine.stop()
    assert moves  # a row left from the middle and the last one took its slot
    for job in jobs:
        expected = greedy(dense, job.request.prompt_ids, job.request.sampling.max_tokens, set())
        assert job.tokens == expected, tok.decode(job.request.prompt_ids)


def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("runtime", ["static", "dynamic"])
def test_serving_records_no_autograd_graph_and_keeps_nothing(runtime, served_checkpoint, tok):
    """A served model's forwards record no autograd graph: with one (a prefill outside
    inference mode, the model's parameters requiring gradients), the in-place writes into
    the KV cache chained every prefill's activations and dequantized weights onto the
    cache, and an H200 serving the 8B shape grew by about 0.3 GB a request until it ran out
    of memory. Rounds of requests leave the live tensors as they were."""
    served = load_quantized_model(served_checkpoint)
    assert not any(p.requires_grad for p in served.parameters())
    if runtime == "static":
        batch = StaticBatch(served, torch.device("cpu"), 0, rows=2, capacity=64)
        logits, _ = batch.prefill([tok(PROMPTS[0]).input_ids])
        assert not logits.requires_grad and batch.kv.grad_fn is None
    engine = Engine(served, tok, torch.device("cpu"), max_batch=3, runtime=runtime)
    counts = []
    try:
        for _ in range(3):
            jobs = []
            for i, m in enumerate((5, 2, 4)):
                sampling = Sampling(max_tokens=m, temperature=0, ignore_eos=True)
                jobs.append(Collected(tok(PROMPTS[i]).input_ids, sampling))
                engine.submit(jobs[-1].request)
            for job in jobs:
                assert job.done.wait(120) and len(job.tokens) == job.request.sampling.max_tokens
            del jobs
            # a job is done when its last token is handed out, inside the engine's step
            # (and `running` drops there too): count once that step has ended, not while
            # its tensors live (CI saw [822, 822, 825] when the count raced the step)
            assert engine.wait_idle(30)
            assert not engine.waiting and not engine.running
            if runtime == "static":
                assert engine._batch.kv.grad_fn is None and not engine._batch.kv.requires_grad
            counts.append(_live_tensors())
    finally:
        engine.stop()
    assert counts[2] <= counts[1], counts


def test_live_tensor_count_waits_for_the_step_that_finished_the_round(
    served_checkpoint, tok, monkeypatch
):
    """The count above once raced the engine's step (CI: [822, 822, 825]): the last job of a
    round is done, and `running` is 0, while the step that finished it still holds its
    logits. Made slow on the third round's last finish, that step must end before the
    count (Engine.wait_idle); the earlier wait on `running` failed here ([163, 163, 169])."""
    import time

    from gptq_worker.serve import generate

    emit, finished = generate.Engine._emit, []

    def slow_emit(self, r, chunk):
        emit(self, r, chunk)
        if chunk.finish_reason is not None:
            finished.append(r)
            if len(finished) == 9:
                time.sleep(0.3)

    monkeypatch.setattr(generate.Engine, "_emit", slow_emit)
    test_serving_records_no_autograd_graph_and_keeps_nothing("dynamic", served_checkpoint, tok)
    assert len(finished) == 9


def test_static_runtime_refuses_what_a_row_cannot_hold(served_checkpoint, tok):
    from gptq_worker.serve.generate import Request, TooLarge

    served = load_quantized_model(served_checkpoint)
    engine = Engine(
        served, tok, torch.device("cpu"), max_batch=4, kv_cache_tokens=200, runtime="static"
    )
    try:
        assert engine.kv_cache_tokens == 200 and engine._batch.max_rows == 1
        with pytest.raises(TooLarge):
            engine.submit(Request([5] * 150, Sampling(max_tokens=60), lambda c: None))
    finally:
        engine.stop()


def _staggered(engine, tok, samplings):
    """Submit PROMPTS[i] with samplings[i], each after the previous one's first token (so
    rows join a batch that is decoding); returns the collected jobs."""
    jobs = []
    try:
        for i, sampling in enumerate(samplings):
            job = Collected(tok(PROMPTS[i % len(PROMPTS)]).input_ids, sampling)
            engine.submit(job.request)
            jobs.append(job)
            if i < len(samplings) - 1:
                assert job.first.wait(60)
        for job in jobs:
            assert job.done.wait(120)
    finally:
        engine.stop()
    return jobs


def test_overlapped_steps_give_the_tokens_of_steps_that_wait(served_checkpoint, tok):
    """The engine launches step N+1 (inputs: step N's greedy tokens, on the device) before
    it reads step N's: the same tokens as steps that wait for theirs, rows finishing at
    every step (their extra token dropped), a sampled row switching to waiting steps."""
    served = load_quantized_model(served_checkpoint)
    samplings = [Sampling(max_tokens=m, temperature=0, ignore_eos=True) for m in (9, 3, 7, 1, 5)]
    samplings.insert(3, Sampling(max_tokens=4, temperature=0.8, seed=7, ignore_eos=True))
    got = {}
    for overlap in (True, False):
        engine = Engine(served, tok, torch.device("cpu"), max_batch=3, runtime="static",
                        overlap=overlap)  # fmt: skip
        batch, launched = engine._batch, []
        original = batch.launch
        batch.launch = lambda *a, o=original, n=launched, **k: (n.append(1), o(*a, **k))[1]
        jobs = _staggered(engine, tok, samplings)
        assert bool(launched) == overlap
        for job, s in zip(jobs, samplings, strict=True):
            assert len(job.tokens) == s.max_tokens and job.chunks[-1].finish_reason == "length"
            assert job.chunks[-1].error is None
        assert not batch.rows and engine._pending is None
        got[overlap] = [job.tokens for job in jobs]
    assert got[True] == got[False]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_combined_step_fails_only_the_new_prompts(overlap, served_checkpoint, tok):
    """A decode step that also prefills new prompts fails (injected): the new requests
    fail, the running rows step again alone and get their greedy tokens."""
    served = load_quantized_model(served_checkpoint)
    dense = dense_copy(load_quantized_model(served_checkpoint))
    engine = Engine(served, tok, torch.device("cpu"), max_batch=3, runtime="static",
                    overlap=overlap)  # fmt: skip
    batch = engine._batch
    first = Collected(tok(PROMPTS[0]).input_ids, Sampling(max_tokens=10, temperature=0))
    new = Collected(tok(PROMPTS[2]).input_ids, Sampling(max_tokens=4, temperature=0))
    failed = []

    def broken(*a, **k):
        failed.append(1)
        raise RuntimeError("injected")

    launch = batch.launch
    try:
        engine.submit(first.request)
        assert first.first.wait(60)
        batch.mixes = lambda prompts, decoding=True: True  # the combined step, as on a GPU
        batch.mixed = broken
        batch.launch = lambda prompts=(): broken() if prompts else launch(prompts)
        engine.submit(new.request)
        assert new.done.wait(60) and first.done.wait(120)
    finally:
        engine.stop()
    assert failed
    assert new.chunks[-1].finish_reason == "error" and "injected" in new.chunks[-1].error
    assert first.chunks[-1].finish_reason in ("length", "stop")
    expected = greedy(dense, first.request.prompt_ids, 10, engine.eos)
    assert first.tokens == expected


FUSED_ENGINE_CHECK = r"""
import sys
import threading
import torch
from transformers import AutoTokenizer
from gptq_worker.serve.generate import Chunk, Engine, Request, Sampling
from gptq_worker.serve.model import load_quantized_model

model = load_quantized_model(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
prompts = [[3, 17, 42, 9, 250, 11], [5, 6, 7], [99, 100, 101, 102, 103]]
lengths = [6, 2, 3]


def run(fused, overlap):
    engine = Engine(model, tok, torch.device("cpu"), max_batch=3, runtime="static",
                    overlap=overlap)
    engine._batch.fused = fused  # the flat fused step (Triton's interpreter), no graphs
    launch, mixed = engine._batch.launch, []
    engine._batch.launch = lambda p=(): (mixed.append(len(p) and len(engine._batch.rows)),
                                         launch(p))[1]
    out, events = [], []
    for p, m in zip(prompts, lengths):
        got, first, done = [], threading.Event(), threading.Event()

        def emit(c, got=got, first=first, done=done):
            if c.token is not None:
                got.append(c.token)
            first.set()
            if c.finish_reason is not None:
                assert c.finish_reason == "length", c
                done.set()

        engine.submit(Request(p, Sampling(max_tokens=m, temperature=0, ignore_eos=True), emit))
        first.wait(600)
        out.append(got)
        events.append(done)
    for e in events:
        assert e.wait(600)
    engine.stop()
    assert not overlap or any(mixed), mixed  # a prompt prefilled beside decoding rows
    return out


reference = run(False, False)
got = run(True, True)
assert got == reference, (got, reference)
print("overlapped fused steps equal")
"""


def test_overlapped_fused_steps_prefill_beside_rows(served_checkpoint):
    """The overlapped engine on the flat fused step (Triton's interpreter): new prompts
    prefill inside a launched step beside the decoding rows, their first token fed on the
    device; the tokens equal the torch step's, waited for."""
    pytest.importorskip("triton")
    assert "overlapped fused steps equal" in _interpreted(
        FUSED_ENGINE_CHECK, str(served_checkpoint)
    )


def test_a_row_cancelled_between_overlapped_steps_ends_at_once(served_checkpoint, tok):
    """A client leaves while its row has a step in flight: it ends "cancelled" (the step's
    token for it is dropped) and the other row keeps its greedy tokens."""
    served = load_quantized_model(served_checkpoint)
    dense = dense_copy(load_quantized_model(served_checkpoint))
    engine = Engine(served, tok, torch.device("cpu"), max_batch=2, runtime="static")
    assert engine.overlap
    keep = Collected(tok(PROMPTS[0]).input_ids, Sampling(max_tokens=8, temperature=0))
    leave = Collected(tok(PROMPTS[2]).input_ids, Sampling(max_tokens=40, temperature=0))
    try:
        engine.submit(leave.request)
        engine.submit(keep.request)
        assert leave.first.wait(60)
        leave.request.cancelled.set()
        assert leave.done.wait(60) and keep.done.wait(120)
    finally:
        engine.stop()
    assert leave.chunks[-1].finish_reason == "cancelled" and len(leave.tokens) < 40
    assert keep.tokens == greedy(dense, keep.request.prompt_ids, 8, engine.eos)
    assert [c.finish_reason for c in leave.chunks].count("cancelled") == 1


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory, tokenizer, calibration_file):
    """4-bit g32 asymmetric checkpoints of the tiny Qwen2 (its q/k/v biases set to random
    values: transformers initialises them to zero, which would hide a dropped bias),
    Qwen3 (its q/k norms' weights likewise, from ones) and Mistral."""
    from gptq_worker.demo.models import tiny_model

    made = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            source = tmp_path_factory.mktemp("source-" + model_type)
            model = tiny_model(model_type, len(tokenizer))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, module in model.named_modules():
                    bias = getattr(module, "bias", None)
                    if isinstance(module, torch.nn.Linear) and bias is not None:
                        bias.copy_((torch.randn(bias.shape, generator=gen) * 0.5).half().float())
                    if name.endswith(("q_norm", "k_norm")):  # Qwen3's, initialised to ones
                        w = module.weight
                        w.copy_((1 + torch.randn(w.shape, generator=gen) * 0.3).half().float())
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
            out = tmp_path_factory.mktemp("static-" + model_type) / "w4g32-asym"
            quantize(worker_config(source, out, calibration_file, bits=4, group_size=32, sym=False))
            made[model_type] = out
        return made[model_type]

    return make


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_static_runtime_serves_the_llama_like_models(model_type, llama_like, tok):
    """Qwen2, Qwen3 and Mistral run the static runtime: its prefill logits are the
    transformers forward's, and its tokens plain greedy decoding's of the dequantized
    model."""
    checkpoint = llama_like(model_type)
    model = load_quantized_model(checkpoint)
    assert unsupported(model) is None
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert (bias is not None and bias.abs().max() > 0.1) == (model_type == "qwen2")
    prompts = [tok(t).input_ids for t in PROMPTS[:3]]
    batch = StaticBatch(model, torch.device("cpu"), 0, rows=4, capacity=128)
    logits, _ = batch.prefill(prompts)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
    dense = dense_copy(load_quantized_model(checkpoint))
    engine = Engine(model, tok, torch.device("cpu"), max_batch=2, runtime="static")
    assert engine.runtime == "static"
    try:
        jobs = []
        for text in PROMPTS[:3]:
            sampling = Sampling(max_tokens=10, temperature=0, ignore_eos=True)
            job = Collected(tok(text).input_ids, sampling)
            engine.submit(job.request)
            jobs.append(job)
        for job in jobs:
            assert job.done.wait(120)
    finally:
        engine.stop()
    for job in jobs:
        assert job.tokens == greedy(dense, job.request.prompt_ids, 10, set())


LIKE_STEP_CHECK = r"""
import sys
import torch
from gptq_worker.serve.model import load_quantized_model
from gptq_worker.serve.static import StaticBatch

torch.manual_seed(0)
model = load_quantized_model(sys.argv[1])
batch = StaticBatch(model, torch.device("cpu"), 0, rows=2, capacity=64, graphs=False)
batch.fused = True
check = batch.self_check([3, 17, 42, 9, 250, 11])
assert check["decode_step_argmax_equal"] and check["decode_step_vs_torch_rel_err"] < 1e-4, check
print("fused step equal")
"""


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_fused_decode_step_adds_biases_and_head_norms(model_type, llama_like):
    """Qwen2's q/k/v biases and Qwen3's q/k norms in the GPU's fused step (through
    Triton's interpreter) against the torch step."""
    pytest.importorskip("triton")
    assert "fused step equal" in _interpreted(LIKE_STEP_CHECK, str(llama_like(model_type)))


@pytest.mark.parametrize(
    ("model_type", "overrides", "reason"),
    [
        ("mistral", {"sliding_window": 16}, "sliding-window attention (a 16-token window"),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
            "sliding-window attention",
        ),
        ("gemma", {}, "model type 'gemma'"),
        ("llama", {"hidden_act": "gelu"}, "MLP activation 'gelu'"),
    ],
)
def test_static_runtime_names_what_it_cannot_run(model_type, overrides, reason):
    from gptq_worker.demo.models import tiny_model

    model = tiny_model(model_type, 300, **overrides)
    assert reason in unsupported(model)


def test_a_window_as_long_as_the_context_is_full_attention():
    from gptq_worker.demo.models import tiny_model

    assert unsupported(tiny_model("mistral", 300, sliding_window=1024)) is None  # context 1024
    assert unsupported(tiny_model("qwen2", 300, sliding_window=16)) is None  # not in use


def test_the_fused_step_knows_transformers_silu(served_checkpoint):
    """transformers' ACT2FN gives its own SiLUActivation (not torch.nn.SiLU): the fused step
    must still take its silu_mul kernel for it (it fell back to three torch ops before)."""
    from transformers.activations import ACT2FN

    from gptq_worker.serve.static import _Layer, is_silu

    assert is_silu(ACT2FN["silu"]) and is_silu(torch.nn.SiLU())
    assert not is_silu(ACT2FN["gelu"]) and not is_silu(torch.nn.Identity())
    model = load_quantized_model(served_checkpoint)
    assert _Layer(model.model.layers[0]).silu
