"""The layer cut between attention and MLP (pipeline/split.py): fewer forwards, same bits.

Passes that need only the MLP's inputs run the MLP half from the residual between the
halves instead of the whole layer. The checkpoint must not change by a bit, and the
saving must be real: o_proj (the end of the attention half) runs fewer times per batch.
"""

from __future__ import annotations

import pytest
import torch

from gptq_compat.config import QuantizeConfig
from gptq_worker.arch import architecture_for
from gptq_worker.demo.models import tiny_model
from gptq_worker.pipeline import split as split_module
from gptq_worker.pipeline.capture import capture_inputs
from gptq_worker.pipeline.driver import EngineOptions, quantize_layers
from gptq_worker.pipeline.plan import plan
from gptq_worker.pipeline.split import LayerSplit
from gptq_worker.pipeline.state import WorkState
from gptq_worker.progress.events import Progress

CPU = torch.device("cpu")
LAYERS = 2
BATCHES = 4


@pytest.fixture(scope="module")
def calibration_ids(tokenizer, corpus) -> torch.Tensor:
    ids = tokenizer(corpus[:100_000]).input_ids
    return torch.tensor(ids[: BATCHES * 2 * 48]).view(BATCHES * 2, 48)


def run_engine(tmp_path, vocab, ids, model_type, counted="self_attn.o_proj", **quantization):
    """Packed tensors, the final hidden states, and the forwards of module ``counted`` per
    layer and batch."""
    model = tiny_model(model_type, vocab, hidden=128, layers=LAYERS, intermediate=256)
    arch = architecture_for(model)
    cfg = QuantizeConfig(**quantization)
    acts = capture_inputs(model, arch, list(ids.split(2)), CPU)
    calls = [0]
    for layer in model.get_submodule(arch.layers):
        layer.get_submodule(counted).register_forward_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)
        )
    state = WorkState(tmp_path / f"state-{len(list(tmp_path.iterdir()))}", "test")
    state.open()
    packed = quantize_layers(
        model, arch, cfg, plan(model, arch, cfg), acts, CPU, state,
        Progress(None, LAYERS, show_bar=False), options=EngineOptions(profile=False),
    )  # fmt: skip
    return packed, torch.cat(acts.hidden), calls[0] / (LAYERS * BATCHES)


@pytest.mark.parametrize("model_type", sorted(split_module.SPLITS))
def test_the_halves_reproduce_the_whole_layer(tokenizer, calibration_ids, model_type):
    model = tiny_model(model_type, len(tokenizer), hidden=128, layers=LAYERS, intermediate=256)
    arch = architecture_for(model)
    acts = capture_inputs(model, arch, list(calibration_ids.split(2)), CPU)
    split = LayerSplit.for_model(model)
    assert split is not None
    assert split.reproduces(model.get_submodule(arch.layers)[0], acts, 0)


def test_a_wrong_cut_is_caught(tokenizer, calibration_ids):
    """The residual is the input of post_attention_layernorm, not of the MLP (its norm):
    the check compares bits and says no, so the engine would run layers whole."""
    model = tiny_model("llama", len(tokenizer), hidden=128, layers=LAYERS, intermediate=256)
    arch = architecture_for(model)
    acts = capture_inputs(model, arch, list(calibration_ids.split(2)), CPU)
    layer = model.get_submodule(arch.layers)[0]
    assert not LayerSplit("self_attn", "mlp").reproduces(layer, acts, 0)
    assert not LayerSplit("no_such_module", "post_attention_layernorm").reproduces(layer, acts, 0)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "quantization",
    [
        {"bits": 4, "group_size": 32},  # the default: act-order, static groups, GPTAQ
        {"bits": 4, "group_size": 32, "gptaq": False, "desc_act": False},
        {"bits": 3, "group_size": 32, "sym": False, "dynamic": {"-:.*self_attn.o_proj": {}}},
    ],
    ids=["default-gptaq", "plain", "o-skipped"],
)
def test_split_forwards_write_the_same_bits(
    tmp_path, monkeypatch, tokenizer, calibration_ids, model_type, quantization
):
    cut, cut_hidden, cut_calls = run_engine(
        tmp_path, len(tokenizer), calibration_ids, model_type, **quantization
    )
    monkeypatch.setattr(split_module, "SPLITS", {})
    whole, whole_hidden, whole_calls = run_engine(
        tmp_path, len(tokenizer), calibration_ids, model_type, **quantization
    )
    assert cut.keys() == whole.keys()
    for key in whole:
        assert torch.equal(cut[key], whole[key]), key
    assert torch.equal(cut_hidden, whole_hidden)
    # no autograd graph behind the stream (the model's parameters require grad): a forward
    # outside no_grad kept every batch's activations alive (27 GiB more on an 8B layer)
    assert not cut_hidden.requires_grad
    assert cut_calls < whole_calls


def test_o_proj_runs_twice_per_batch_with_gptaq(tmp_path, tokenizer, calibration_ids):
    """Default (GPTAQ, true-sequential): whole layers run o_proj five times per batch (the
    partly quantized stream in the gate/up and down passes and the final forward, the
    full-precision stream in the gate/up and down passes); split, twice: once per stream,
    on the way to the residual between the halves. On batch 0 of the first layer, two more
    for the split's check (the whole forward, then the attention half) and two for the
    replay's (the attention half computed, then replayed)."""
    _, _, cut_calls = run_engine(tmp_path, len(tokenizer), calibration_ids, "llama")
    assert cut_calls == pytest.approx(2 + 4 / (LAYERS * BATCHES))


@pytest.mark.parametrize(
    "quantization, streams",
    [({"bits": 4, "group_size": 32}, 2), ({"bits": 4, "group_size": 32, "gptaq": False}, 1)],
    ids=["default-gptaq", "plain"],
)
def test_attention_is_computed_once_per_stream_and_batch(
    tmp_path, monkeypatch, tokenizer, calibration_ids, quantization, streams
):
    """q_proj (the start of the attention computation) runs once per stream and batch: in
    the o_proj pass. The pass after it, which moves the partly quantized stream to the
    residual, replays the attention half from o_proj's kept inputs. Computed again
    (GPTQ_WORKER_REPLAY_ATTENTION=0) it runs once more per batch, and the bits are the same.
    Batch 0 of the first layer adds the checks: two for the split, one for the replay."""
    vocab, ids = len(tokenizer), calibration_ids
    replayed, replayed_hidden, calls = run_engine(
        tmp_path, vocab, ids, "llama", "self_attn.q_proj", **quantization
    )
    assert calls == pytest.approx(streams + 3 / (LAYERS * BATCHES))
    monkeypatch.setenv("GPTQ_WORKER_REPLAY_ATTENTION", "0")
    computed, computed_hidden, calls = run_engine(
        tmp_path, vocab, ids, "llama", "self_attn.q_proj", **quantization
    )
    assert calls == pytest.approx(streams + 1 + 2 / (LAYERS * BATCHES))
    assert replayed.keys() == computed.keys()
    for key in computed:
        assert torch.equal(replayed[key], computed[key]), key
    assert torch.equal(replayed_hidden, computed_hidden)


def test_a_wrong_replay_is_caught(tmp_path, monkeypatch, tokenizer, calibration_ids):
    """An attention module that does more after o_proj (here: halves its output) cannot be
    replayed from o_proj's inputs: the check on the first layer compares bits and says no,
    and the engine computes the attention half in every pass, writing the checkpoint it
    writes without a replay."""
    from transformers.models.llama import modeling_llama

    vocab, ids = len(tokenizer), calibration_ids
    model = tiny_model("llama", vocab, hidden=128, layers=LAYERS, intermediate=256)
    arch = architecture_for(model)
    acts = capture_inputs(model, arch, list(ids.split(2)), CPU)
    layer = model.get_submodule(arch.layers)[0]
    kept: list[torch.Tensor] = []
    layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: kept.append(a[0]))
    layer(acts.hidden[0], *acts.args[0][0], **acts.kwargs[0][0])
    split = LayerSplit.for_model(model)
    assert split.replays(layer, acts.hidden[0], acts.args[0][0], acts.kwargs[0][0], kept[0])
    wrong = LayerSplit("self_attn", "post_attention_layernorm", "self_attn.v_proj")
    assert not wrong.replays(layer, acts.hidden[0], acts.args[0][0], acts.kwargs[0][0], kept[0])

    attention = modeling_llama.LlamaAttention.forward

    def halved(self, *args, **kwargs):
        out, weights = attention(self, *args, **kwargs)
        return out * 0.5, weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", halved)
    assert not split.replays(layer, acts.hidden[0], acts.args[0][0], acts.kwargs[0][0], kept[0])
    plain = {"bits": 4, "group_size": 32, "gptaq": False}
    caught, caught_hidden, calls = run_engine(
        tmp_path, vocab, ids, "llama", "self_attn.q_proj", **plain
    )
    assert calls == pytest.approx(2 + 3 / (LAYERS * BATCHES))  # computed in both passes
    monkeypatch.setenv("GPTQ_WORKER_REPLAY_ATTENTION", "0")
    computed, computed_hidden, _ = run_engine(tmp_path, vocab, ids, "llama", **plain)
    for key in computed:
        assert torch.equal(caught[key], computed[key]), key
    assert torch.equal(caught_hidden, computed_hidden)


@pytest.mark.parametrize("kept", [0, 2])
def test_batches_kept_as_memory_allows(tmp_path, monkeypatch, tokenizer, calibration_ids, kept):
    """Where the GPU's free memory holds o_proj's inputs for only some batches, those are
    replayed and the others computed (0: none kept, no replay and no check); the bits are
    those of a run that computes every batch."""
    from gptq_worker.pipeline import driver

    vocab, ids = len(tokenizer), calibration_ids
    plain = {"bits": 4, "group_size": 32, "gptaq": False}
    monkeypatch.setattr(driver, "_batches_to_keep", lambda *_: kept)
    some, some_hidden, calls = run_engine(
        tmp_path, vocab, ids, "llama", "self_attn.q_proj", **plain
    )
    checks = (2 + (1 if kept else 0)) / (LAYERS * BATCHES)
    assert calls == pytest.approx(1 + (BATCHES - kept) / BATCHES + checks)
    monkeypatch.setenv("GPTQ_WORKER_REPLAY_ATTENTION", "0")
    computed, computed_hidden, _ = run_engine(tmp_path, vocab, ids, "llama", **plain)
    for key in computed:
        assert torch.equal(some[key], computed[key]), key
    assert torch.equal(some_hidden, computed_hidden)


def test_the_kept_batches_fit_the_free_memory_beyond_the_margin(monkeypatch):
    """On a GPU, the first batches whose o_proj inputs fit the free memory (the device's
    free memory plus the allocator's unused cache) beyond the larger of 2 GiB and a tenth
    of the device; on a CPU, all."""
    from gptq_worker.pipeline import driver
    from gptq_worker.pipeline.capture import Activations

    GiB = 1 << 30
    o_proj = torch.nn.Linear(64, 32, bias=False)  # in_features 64: 2 bytes x 64 a token
    acts = Activations(hidden=[torch.zeros(4, 1024, 32, dtype=torch.float16)] * 8)
    batch = 4 * 1024 * 64 * 2  # 0.5 MiB
    assert driver._batches_to_keep(torch.device("cpu"), acts, o_proj) == 8

    def on_gpu(free, total, reserved, allocated):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d: (free, total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda _d: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda _d: allocated)
        return driver._batches_to_keep(torch.device("cuda"), acts, o_proj)

    assert on_gpu(2 * GiB + 3 * batch, 16 * GiB, 0, 0) == 3
    assert on_gpu(2 * GiB + 2 * batch, 16 * GiB, 5 * batch, 4 * batch) == 3  # unused cache
    assert on_gpu(8 * GiB + 5 * batch, 80 * GiB, 0, 0) == 5  # a tenth of 80 GiB
    assert on_gpu(GiB, 16 * GiB, 0, 0) == 0
    assert on_gpu(40 * GiB, 80 * GiB, 0, 0) == 8
