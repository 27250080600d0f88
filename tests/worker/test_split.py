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


def run_engine(tmp_path, vocab, ids, model_type, **quantization):
    """Packed tensors, the final hidden states, and o_proj forwards per layer and batch."""
    model = tiny_model(model_type, vocab, hidden=128, layers=LAYERS, intermediate=256)
    arch = architecture_for(model)
    cfg = QuantizeConfig(**quantization)
    acts = capture_inputs(model, arch, list(ids.split(2)), CPU)
    calls = [0]
    for layer in model.get_submodule(arch.layers):
        layer.self_attn.o_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
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
    on the way to the residual between the halves. One more for the check on batch 0 of
    the first layer (twice: the whole forward, then the attention half)."""
    _, _, cut_calls = run_engine(tmp_path, len(tokenizer), calibration_ids, "llama")
    assert cut_calls == pytest.approx(2 + 2 / (LAYERS * BATCHES))
