"""The built-in runtime's model path: packed weights, batched decoding, text streaming."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from gptq_worker.format.pack import dequantize_packed
from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.generate import Chunk, Engine, Request, Sampling
from gptq_worker.serve.model import QuantLinear, load_quantized_model
from gptq_worker.serve.text import TextStream

from .conftest import worker_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_dir, calibration_file):
    out = tmp_path_factory.mktemp("serve") / "w4g32"
    quantize(worker_config(model_dir("llama"), out, calibration_file, bits=4, group_size=32))
    return out


def dense_copy(model: nn.Module) -> nn.Module:
    """The same model with every QuantLinear replaced by an nn.Linear of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            weight = dequantize_packed(
                module.qweight, module.qzeros, module.scales, module.g_idx, module.bits, module.fmt
            )
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def greedy(model: nn.Module, ids: list[int], steps: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding without a cache, one prompt, no padding."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
    return out[len(ids) :]


def run_engine(engine: Engine, prompts: list[list[int]], sampling: Sampling) -> list[list[Chunk]]:
    """Submit all prompts at once (one batch) and collect every chunk."""
    results: list[list[Chunk]] = [[] for _ in prompts]
    finished = [threading.Event() for _ in prompts]

    def collector(i: int):
        def emit(chunk: Chunk) -> None:
            results[i].append(chunk)
            if chunk.finish_reason is not None:
                finished[i].set()

        return emit

    for i, p in enumerate(prompts):
        engine.submit(Request(p, sampling, collector(i)))
    for f in finished:
        assert f.wait(60)
    return results


def test_packed_forward_equals_the_dequantized_model(checkpoint, tokenizer):
    served = load_quantized_model(checkpoint)
    dense = dense_copy(load_quantized_model(checkpoint))
    ids = torch.tensor([tokenizer("def parse(self, text):\n    return").input_ids])
    with torch.no_grad():
        a, b = served(ids).logits, dense(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantlinear_in_fp16_matches_the_fp32_product_rounded(checkpoint):
    served = load_quantized_model(checkpoint)
    layer = next(m for m in served.modules() if isinstance(m, QuantLinear))
    exact = layer.dequantized_weight(torch.float32).half()
    assert torch.equal(layer.dequantized_weight(torch.float16), exact)


def _int4_layer(act_order: bool, bits: int = 4, n: int = 128, with_bias: bool = True):
    """A QuantLinear of random codes (group 32, asymmetric), packed as the engine packs."""
    from gptq_compat.config import CheckpointFormat
    from gptq_worker.format.pack import pack_qweight, pack_qzeros

    g = torch.Generator().manual_seed(bits + act_order)
    k, size = 256, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(1, 2**bits, (k // size, n), generator=g)
    scales = (torch.rand(k // size, n, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    fmt = CheckpointFormat.GPTQ
    bias = torch.randn(n, generator=g).half() if with_bias else None
    return QuantLinear(
        pack_qweight(codes, bits), pack_qzeros(zeros, bits, fmt), scales, g_idx.int(), bias,
        bits, fmt,
    )  # fmt: skip


@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_int4_kernel_computes_the_dequantized_product(act_order):
    """bfloat16 on a CPU: 4-bit layers run torch's int4 matmul (act-order inputs permuted);
    the product is the dequantized weight's within bfloat16's rounding."""
    layer = _int4_layer(act_order)
    assert layer.cpu_int4() is not None
    assert (layer.cpu_int4()[3] is not None) == act_order
    x = torch.randn(5, 256)
    expected = x @ layer.dequantized_weight(torch.float32).t() + layer.bias.float()
    with torch.no_grad():
        got = layer(x.to(torch.bfloat16)).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2
    # the same call through the dequantized path agrees as closely (no int4 kernel)
    layer._int4, layer._int4_none = None, True
    with torch.no_grad():
        slow = layer(x.to(torch.bfloat16)).float()
    assert ((got - slow).norm() / slow.norm()).item() < 1e-2


def test_cpu_int4_kernel_is_skipped_where_it_cannot_read_the_layer():
    assert _int4_layer(False, bits=3).cpu_int4() is None  # 4 bits only
    assert _int4_layer(False, n=96).cpu_int4() is None  # out_features a multiple of 64
    layer = _int4_layer(False, n=96, with_bias=False)
    x = torch.randn(2, 256)
    with torch.no_grad():  # the portable path serves it instead
        got = layer(x.to(torch.bfloat16)).float()
    expected = x @ layer.dequantized_weight(torch.float32).t()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def test_bfloat16_on_a_cpu_serves_through_the_int4_kernel(checkpoint, tokenizer):
    from gptq_worker.serve.model import CPU_INT4_KERNEL, load

    loaded = load(checkpoint, "m", "cpu", max_batch=2, max_queue=4, dtype="bfloat16")
    try:
        assert loaded.info["dtype"] == "bfloat16"
        assert loaded.info["kernel"] == CPU_INT4_KERNEL
        ids = tokenizer("def parse(self, text):").input_ids
        chunks = run_engine(loaded.engine, [ids], Sampling(max_tokens=6, temperature=0))[0]
        assert chunks[-1].finish_reason in ("length", "stop") and chunks[-1].tokens >= 1
    finally:
        loaded.engine.stop()


def test_batched_greedy_tokens_equal_the_dequantized_model(checkpoint, tokenizer):
    """Prompts of different lengths share one left-padded batch and one KV cache."""
    served = load_quantized_model(checkpoint)
    dense = dense_copy(load_quantized_model(checkpoint))
    prompts = [
        tokenizer("import os\nimport sys\n\ndef main(argv):\n    ").input_ids,
        tokenizer("class").input_ids,
        tokenizer("    for key, value in sorted(items.items()):\n").input_ids,
    ]
    engine = Engine(served, tokenizer, torch.device("cpu"), max_batch=8)
    try:
        steps = 24
        chunks = run_engine(engine, prompts, Sampling(max_tokens=steps, temperature=0))
    finally:
        engine.stop()
    for prompt, got in zip(prompts, chunks, strict=True):
        expected = greedy(dense, prompt, steps, engine.eos)
        text = "".join(c.text for c in got)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert got[-1].tokens == len(expected)
        assert got[-1].finish_reason == ("stop" if expected[-1] in engine.eos else "length")


def test_seeded_sampling_repeats_and_differs_by_seed(checkpoint, tokenizer):
    served = load_quantized_model(checkpoint)
    engine = Engine(served, tokenizer, torch.device("cpu"))
    prompt = tokenizer("def ").input_ids
    try:
        texts = []
        for seed in (1, 1, 2):
            s = Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=seed)
            texts.append("".join(c.text for c in run_engine(engine, [prompt], s)[0]))
    finally:
        engine.stop()
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_packed_weights_take_about_a_quarter_of_fp16(tmp_path, model_dir, calibration_file):
    """Measured on the loaded model's tensors: packed codes + scales + zeros + g_idx."""
    source = model_dir("llama", hidden=512, intermediate=1024, layers=2, heads=8)
    out = tmp_path / "w4g128"
    quantize(
        worker_config(
            source, out, calibration_file, bits=4, group_size=128, method="rtn", nsamples=2
        )
    )
    served = load_quantized_model(out, dtype=torch.float16)
    layers = [m for m in served.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.packed_bytes() for m in layers)
    fp16 = sum(m.in_features * m.out_features * 2 for m in layers)
    # 4/16 for the codes, plus fp16 scales and zeros per 128 weights and int32 g_idx per row
    assert 0.25 < packed / fp16 < 0.28
    buffers = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    assert buffers / fp16 < 0.30  # everything the layers hold, shifts and raw qzeros included


class _CharTokenizer:
    """One character per token: enough to exercise TextStream."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(
    ("text", "stop", "expected", "hit"),
    [
        ("hello world", ("wor",), "hello ", True),
        ("hello world", ("xyz",), "hello world", False),
        ("a\n\nb", ("\n\n",), "a", True),
        ("abcab", ("abd",), "abcab", False),  # a partial match is held back, then released
        ("stop at once", ("stop",), "", True),
    ],
)
def test_text_stream_cuts_at_stop_strings(text, stop, expected, hit):
    stream = TextStream(_CharTokenizer(), stop)
    sent, stopped = "", False
    for ch in text:
        delta, stopped = stream.push(ord(ch))
        sent += delta
        if stopped:
            break
    if not stopped:
        sent += stream.flush()
    assert (sent, stopped) == (expected, hit)


def test_text_stream_holds_back_a_partial_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), ())
    euro = "€".encode()
    assert stream.push(ord("x")) == ("x", False)
    assert stream.push(euro[0]) == ("", False)
    assert stream.push(euro[1]) == ("", False)
    assert stream.push(euro[2]) == ("€", False)


def test_cpu_int4_kernel_that_disagrees_is_not_used(monkeypatch):
    """A torch whose int4 op reads the packing differently (it changed between releases)
    fails the first-use probe: the layer keeps the portable path and its correct result."""
    real = torch.ops.aten._weight_int4pack_mm_for_cpu

    def shifted(x, w, size, sz):
        return real(x, w, size, sz) + 1.0

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", shifted)
    layer = _int4_layer(False, with_bias=False)
    assert layer.cpu_int4() is None
    x = torch.randn(3, 256)
    expected = x @ layer.dequantized_weight(torch.float32).t()
    with torch.no_grad():
        got = layer(x.to(torch.bfloat16)).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize(("bits", "act_order"), [(3, False), (3, True), (2, False)])
def test_widened_layer_is_the_same_layer(bits, act_order):
    """2/3-bit codes held as 4-bit words (for the GPU's 4-bit kernels): the same dequantized
    weight bit for bit, the same products, a third (3 bits) or all (2 bits) of the codes'
    bytes more."""
    from gptq_worker.format.pack import dequantize_packed

    layer = _int4_layer(act_order, bits=bits)
    weight = layer.dequantized_weight(torch.float32)
    x = torch.randn(3, 256)
    with torch.no_grad():
        before = layer(x)
    old = layer.qweight.numel() * 4
    added = layer.widen()
    assert layer.bits == 4 and layer.qweight.shape == (256 // 8, 128)
    assert added == old * (4 - bits) // bits == layer.qweight.numel() * 4 - old
    assert torch.equal(layer.dequantized_weight(torch.float32), weight)
    # qzeros repacked too: what reads the module's packed tensors reads the same weight
    reread = dequantize_packed(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.fmt
    )
    assert torch.equal(reread.float(), weight.float())
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    assert layer.widen() == 0  # 4 bits now: nothing to do


def test_codes_are_widened_only_where_memory_allows(monkeypatch):
    from gptq_worker.serve import model as serve_model

    def layers():
        return [_int4_layer(False, bits=3), _int4_layer(False, bits=4)]

    from gptq_worker.serve import batch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    extra = 256 * 128 // 8
    monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", "auto")
    monkeypatch.setattr(batch, "available_host_bytes", lambda: 1 << 30)
    assert serve_model.widen_codes(layers(), cpu, torch.float32) == extra  # host memory: ample
    monkeypatch.setattr(batch, "available_host_bytes", lambda: 3 * extra)
    assert serve_model.widen_codes(layers(), cpu, torch.float32) == 0  # past a quarter of it
    monkeypatch.setattr(serve_model.kernels, "triton", object())  # as on a GPU with Triton
    card = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card // 2, card))
    found = layers()
    assert serve_model.widen_codes(found, gpu, torch.float16) == extra
    assert [m.bits for m in found] == [4, 4]
    assert serve_model.widen_codes(layers(), gpu, torch.float32) == 0  # the torch path
    # a model quantized to 3 bits to fit: the extra bytes past a quarter of what is free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * extra, card))
    kept = layers()
    assert serve_model.widen_codes(kept, gpu, torch.float16) == 0
    assert kept[0].bits == 3
    monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", "1")  # always
    assert serve_model.widen_codes(layers(), cpu, torch.float32) == extra
    monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", "0")  # never
    assert serve_model.widen_codes(layers(), gpu, torch.float16) == 0
    two = [_int4_layer(False, bits=2)]  # twice the codes' bytes: 256 * 128 / 4 more
    monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", "auto")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card // 2, card))
    assert serve_model.widen_codes(two, gpu, torch.float16) == 2 * extra
    monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", "yes")
    with pytest.raises(ValueError, match="auto, 0 or 1"):
        serve_model.widen_codes(layers(), gpu, torch.float16)


def test_a_widened_3bit_checkpoint_serves_the_same_tokens(
    tmp_path, model_dir, calibration_file, tokenizer, monkeypatch
):
    from gptq_worker.serve.model import load

    out = tmp_path / "w3"
    quantize(worker_config(model_dir("llama"), out, calibration_file, bits=3, group_size=32))
    ids = tokenizer("def parse(self, text):").input_ids
    tokens = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("GPTQ_SERVE_WIDEN_CODES", setting)
        loaded = load(out, "m", "cpu", max_batch=2, max_queue=4)
        try:
            assert ("codes_in_memory" in loaded.info) == (setting == "1")
            chunks = run_engine(loaded.engine, [ids], Sampling(max_tokens=8, temperature=0))[0]
            tokens[setting] = [c.token for c in chunks]
        finally:
            loaded.engine.stop()
    assert tokens["0"] == tokens["1"] and len(tokens["0"]) >= 1
