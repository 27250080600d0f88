"""Streaming from disk and the GPTAQ full-precision stream give the bits of the whole-model
path: the checkpoint writer against ``safetensors.save_file``, a streamed run against one
that loads the model whole, and cross terms from batch-by-batch full-precision inputs
against cross terms from inputs kept for the whole layer (the path before streaming).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptq_worker.arch import architecture_for
from gptq_worker.demo.models import tiny_model
from gptq_worker.format.tensorfiles import (
    DTYPES,
    TensorFiles,
    pending,
    read_header,
    write_safetensors,
)
from gptq_worker.pipeline import run
from gptq_worker.pipeline.capture import capture_inputs, forward_layer
from gptq_worker.pipeline.hessians import FullPrecisionStream, collect_hessians
from gptq_worker.pipeline.mover import Phases
from gptq_worker.pipeline.source import open_streamed
from gptq_worker.quant.hessian import AsymmetricHessian

from .conftest import worker_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", range(6))
def test_streaming_writer_writes_save_files_bytes(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    dtypes = list(DTYPES.values())
    tensors = {}
    for i in range(int(torch.randint(0, 10, (1,), generator=g))):
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=g))]
        shape = tuple(int(d) for d in torch.randint(0, 5, (i % 4,), generator=g))
        tensors[f"m.{(i * 7919) % 13}.w{i}"] = (torch.randn(shape, generator=g) * 9).to(dtype)
    metadata = {"format": "pt"} if seed % 2 else None
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=metadata)
    items = {k: pending(v) for k, v in tensors.items()}
    write_safetensors(tmp_path / "b.safetensors", items, metadata)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = TensorFiles([tmp_path / "b.safetensors"])
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("model_type", "kwargs", "quantization", "shard"),
    [
        ("llama", {}, {}, "4GB"),
        ("llama", {"tie_word_embeddings": True}, {"lm_head": True}, "200KB"),
        ("gpt2", {}, {"true_sequential": False}, "300KB"),
    ],
)
def test_streamed_run_writes_the_whole_model_runs_bytes(
    tmp_path, monkeypatch, model_dir, calibration_file, model_type, kwargs, quantization, shard
):
    src = model_dir(model_type, **kwargs)
    assert open_streamed(str(src), torch.float32, False) is not None  # it does stream
    outputs = {}
    for how in ("streamed", "whole"):
        if how == "whole":
            monkeypatch.setattr(run, "open_streamed", lambda *a, **k: None)
        cfg = worker_config(src, tmp_path / how, calibration_file, **quantization)
        cfg = cfg.model_copy(update={"max_shard_size": shard})
        run.quantize(cfg, show_progress=False)
        outputs[how] = _files(tmp_path / how)
    assert outputs["streamed"] == outputs["whole"]


def test_batch_by_batch_cross_terms_equal_kept_inputs(tokenizer):
    """The second true-sequential pass (o_proj) after q/k/v changed, both ways."""
    torch.manual_seed(0)
    model = tiny_model("llama", len(tokenizer), layers=1)
    arch = architecture_for(model)
    ids = torch.randint(3, len(tokenizer), (6, 32), generator=torch.Generator().manual_seed(2))
    acts = capture_inputs(model, arch, list(ids.split(2)), CPU)
    layer = model.get_submodule(arch.layers)[0]
    fp_hidden = [h + 0.01 * torch.randn_like(h) for h in acts.hidden]  # streams differ
    head = "self_attn.o_proj"

    kept: list[torch.Tensor] = []  # the old way: every batch's input, from the whole layer
    handle = layer.get_submodule(head).register_forward_pre_hook(
        lambda _m, a: kept.append(a[0].detach())
    )
    fp_out = forward_layer(layer, type(acts)(fp_hidden, acts.args, acts.kwargs), 0)
    handle.remove()

    stream = FullPrecisionStream(fp_hidden, acts)
    stream.begin(layer, 0, copy_weights=True)
    for name in ("q_proj", "k_proj", "v_proj"):  # as if quantized
        w = layer.get_submodule(f"self_attn.{name}").weight
        w.data = w.data + 0.05 * torch.randn_like(w)
    H, D = collect_hessians(
        layer, [[head]], acts, 0, CPU, "fp32", Phases(CPU, False), stream, complete=True
    )[head]
    stream.end()

    ref = AsymmetricHessian(H.shape[0], CPU, "fp32")
    xs: list[torch.Tensor] = []
    handle = layer.get_submodule(head).register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].detach())
    )
    forward_layer(layer, acts, 0)
    handle.remove()
    for x, x_fp in zip(xs, kept, strict=True):
        ref.add_pair(x, x_fp)
    assert torch.equal(H, ref.result()) and torch.equal(D, ref.cross_result())
    for a, b in zip(stream.hidden, fp_out, strict=True):  # the stream moved on exactly
        assert torch.equal(a, b)


def _holds(path: Path, prefix: str) -> bool:
    """Whether the (possibly still growing) shard ``path`` has a tensor named ``prefix...``."""
    try:
        header, _ = read_header(path)
    except (OSError, ValueError, struct.error):
        return False
    return any(k.startswith(prefix) for k in header)


def test_shards_are_written_while_layers_are_quantized(
    tmp_path, model_dir, calibration_file, monkeypatch
):
    """A streamed run writes each finished layer's shards before the next layer is computed
    (one tensor per shard here), and the checkpoint is the one written at the end."""
    src = model_dir("llama")
    staging = run.work_dir_for((tmp_path / "out").resolve()) / "checkpoint"
    on_disk: dict[int, list[str]] = {}

    def on_layer(i: int) -> None:  # layer i is saved; layer i + 1 is not computed yet
        deadline = time.monotonic() + 30
        held: list[str] = []
        while not held and time.monotonic() < deadline:  # the writer thread catches up
            held = [
                p.name for p in staging.glob(".shard-*.partial") if _holds(p, f"model.layers.{i}.")
            ]
            time.sleep(0.02)
        on_disk[i] = held

    cfg = worker_config(src, tmp_path / "out", calibration_file)
    cfg = cfg.model_copy(update={"max_shard_size": "1KB"})
    run.quantize(cfg, show_progress=False, on_layer=on_layer)
    assert on_disk and all(on_disk.values()), on_disk
    monkeypatch.setattr(run, "open_streamed", lambda *a, **k: None)
    whole = worker_config(src, tmp_path / "whole", calibration_file)
    run.quantize(whole.model_copy(update={"max_shard_size": "1KB"}), show_progress=False)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")
