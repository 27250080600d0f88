"""Host <-> GPU transfers of the layer mover give the same bits as plain copies (CUDA only:
skipped where no GPU is present, as in CI; run on a GPU machine).

Layers are read from safetensors files through two pinned staging buffers and copied out
into pinned memory asynchronously; a chunk boundary or a missing synchronisation would
show as a difference here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from gptq_worker.demo.models import tiny_model
from gptq_worker.format.tensorfiles import TensorFiles
from gptq_worker.pipeline.driver import _compile_in_child, _to_cpu
from gptq_worker.pipeline.mover import LayerMover
from gptq_worker.pipeline.source import StreamedLayers, open_streamed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = torch.device("cuda")


@pytest.mark.parametrize("staging", [4096, 1000, 32 << 20])
def test_streamed_layer_on_the_gpu_has_the_files_bits(tmp_path, monkeypatch, staging):
    model = tiny_model("llama", 300, hidden=128, layers=2, intermediate=320)
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(StreamedLayers, "STAGING_BYTES", staging)
    for dtype in (torch.float32, torch.float16):  # as saved, and converted on the device
        opened, layers = open_streamed(str(tmp_path / "m"), dtype, False)
        files = TensorFiles(sorted({e.path for e in layers.files.entries.values()}))
        layer = opened.model.layers[1]
        mover = LayerMover(GPU, layers)
        mover.ready(mover.fetch(layer, 1), layer)
        for name, p in layer.named_parameters():
            want = files[f"model.layers.1.{name}"].to(dtype)
            assert p.device.type == "cuda" and torch.equal(p.cpu(), want), name
        mover.retire(lambda m=mover, x=layer: (m.release(x, 1, set()), m.synchronize()))
        mover.drain()
        for name, p in layer.named_parameters():
            assert p.device.type == "cpu"
            assert torch.equal(p, files[f"model.layers.1.{name}"].to(dtype)), name
        mover.close()


def test_in_memory_layer_round_trip_and_packed_copies_keep_their_bits():
    model = tiny_model("llama", 300, hidden=128, layers=2, intermediate=320)
    layer = model.model.layers[0]
    before = copy.deepcopy(layer.state_dict())
    mover = LayerMover(GPU)
    mover.ready(mover.fetch(layer, 0), layer)
    assert all(p.device.type == "cuda" for p in layer.parameters())
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = {
        f"t{i}": torch.randint(0, 1 << 30, (257, 33), generator=g, device="cuda") for i in range(5)
    }
    got: dict = {}

    def job():
        mover.release(layer, 0, set())
        got.update(_to_cpu(packed))
        mover.synchronize()

    mover.retire(job)
    mover.drain()
    mover.close()
    for k, v in layer.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    for k, v in packed.items():
        assert got[k].device.type == "cpu" and torch.equal(got[k], v.cpu())


@pytest.mark.parametrize(
    "find, norms",
    [
        (None, None),
        ((128, True, False), (4096, torch.float16)),
        ((32, False, True), (960, torch.bfloat16)),
    ],
)
def test_solver_compiles_in_a_child_process(find, norms):
    """The child's command runs (its failures are otherwise silent: the run then compiles in
    its own process), for the base variants and each kind of group-finding one, with and
    without the fused norm's kernel."""
    from gptq_worker.pipeline.driver import _child_argv
    from gptq_worker.pipeline.norms import warm_up as warm_up_norms
    from gptq_worker.quant.solve_triton import warm_up

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        _child_argv(GPU, find, norms),
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _compile_in_child(GPU, find, norms)
    warm_up(GPU, find)
    if norms is not None:
        warm_up_norms(GPU, *norms)


def test_the_warm_up_rehearses_the_default_solve_on_the_gpu():
    from gptq_compat.config import QuantizeConfig
    from gptq_worker.pipeline.driver import EngineOptions, rehearse

    rehearse(GPU, QuantizeConfig(), EngineOptions())


def test_capture_on_the_gpu_gives_back_the_host_parameters():
    from gptq_worker.arch import architecture_for
    from gptq_worker.pipeline.capture import capture_inputs

    model = tiny_model("llama", 300, hidden=64, layers=2, intermediate=128)
    arch = architecture_for(model)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    acts = capture_inputs(model, arch, [torch.randint(0, 300, (2, 16))], GPU)
    assert acts.hidden[0].device.type == "cuda"
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k][1]), k
    embed = model.get_input_embeddings().weight
    assert embed.data_ptr() == before["model.embed_tokens.weight"][0]  # not a copy
