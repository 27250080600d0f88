"""A model read from its safetensors files one decoder layer at a time.

The model is built with every parameter on the meta device (no memory); the parameters
outside the decoder layers (embeddings, final norm, lm_head: 2 GB for an 8B model) are
read at once, and each decoder layer's parameters when the driver needs that layer,
straight onto the accelerator. When a layer is done its quantized weights are dropped
(their packed form is in the work directory) and its other parameters (norms, biases)
go to the CPU for the checkpoint. So the host holds about one layer and the parts outside
the layers, not the model: the whole point for a 70B model on a machine with little RAM.

Streaming applies to a local directory whose safetensors files name every parameter the
model has, as ``save_pretrained`` writes them; anything else is loaded whole by
transformers (``run.load_model``), with the same result.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from gptq_worker.arch import architecture_for
from gptq_worker.format.checkpoint import CheckpointError, shard_files
from gptq_worker.format.tensorfiles import TensorFiles

log = logging.getLogger(__name__)


class StreamedLayers:
    """Reads decoder layer ``i``'s parameters onto a device, and lets them go afterwards."""

    STAGING_BYTES = 32 << 20  # each of the two pinned buffers a layer is read through

    def __init__(self, model: nn.Module, files: TensorFiles, layers_path: str) -> None:
        self.model = model
        self.files = files
        self.layers_path = layers_path
        self._staging: list[torch.Tensor] | None = None

    def load(self, layer: nn.Module, index: int, device: torch.device) -> None:
        """Parameters onto ``device``: on CUDA through pinned buffers on the current stream
        (the caller synchronizes it), elsewhere through ordinary memory."""
        prefix = f"{self.layers_path}.{index}"
        for name, module, leaf, param in _parameters(layer):
            key = f"{prefix}.{name}"
            if device.type == "cuda":
                if self._staging is None:
                    self._staging = [
                        torch.empty(self.STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)
                    ]
                e = self.files.entries[key]
                raw = torch.empty(e.nbytes, dtype=torch.uint8, device=device)
                self.files.read_into(key, raw, self._staging)
                t = raw.view(e.dtype).view(e.shape) if e.shape else raw.view(e.dtype).reshape(())
                t = t.to(dtype=param.dtype)
            else:
                t = self.files[key].to(device=device, dtype=param.dtype)
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        for module in layer.modules():
            for leaf, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[leaf] = buf.to(device)

    def release(self, layer: nn.Module, index: int, quantized: set[str]) -> None:
        """Drop the weights of ``quantized`` (full module names); the rest goes to the CPU."""
        prefix = f"{self.layers_path}.{index}"
        for name, module, leaf, param in _parameters(layer):
            full = f"{prefix}.{name}".rpartition(".")[0]
            if leaf == "weight" and full in quantized:
                t = torch.empty(param.shape, dtype=param.dtype, device="meta")
            else:  # pinned, asynchronous: the caller synchronizes the stream
                t = param.detach().to("cpu", non_blocking=True)
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        for module in layer.modules():
            for leaf, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[leaf] = buf.to("cpu")


def _parameters(layer: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    for mname, module in layer.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None:
                yield (f"{mname}.{leaf}" if mname else leaf), module, leaf, param


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device; buffers (rotary
    tables) stay real, as the model computes them."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def open_streamed(
    source: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[nn.Module, StreamedLayers] | None:
    """The model of local directory ``source`` with its layers left on disk, or None when
    it cannot be streamed (not a local directory of safetensors, or other tensor names)."""
    started = time.monotonic()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        files = TensorFiles(shard_files(path))
    except (FileNotFoundError, CheckpointError, OSError, ValueError, KeyError):
        return None
    # the parameters outside the layers (embeddings, final norm, lm_head: 2 GB for 8B) are
    # read on threads while transformers is imported
    outside = _Prefetch(files)
    try:
        model = _open(path, files, outside, dtype, trust_remote_code, started)
    finally:
        outside.close()
    return model


def _open(
    path: Path,
    files: TensorFiles,
    outside: _Prefetch,
    dtype: torch.dtype,
    trust_remote_code: bool,
    started: float,
) -> tuple[nn.Module, StreamedLayers] | None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    log.info("transformers imported: %.2fs", time.monotonic() - started)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    log.info("model built on the meta device: %.2fs", time.monotonic() - started)
    model.tie_weights()  # the parameters were replaced while they were registered
    try:
        arch = architecture_for(model)
    except ValueError:
        return None
    tied = _tied_keys(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if any(name not in files for name in params - tied):
        return None  # another naming (an old or converted checkpoint): transformers loads it
    inside = f"{arch.layers}."
    for name, module, leaf, param in _parameters(model):
        if name.startswith(inside):
            continue
        if name not in files:  # tied to the input embeddings: tie_weights below
            continue
        t = outside.get(name).to(dtype=param.dtype)
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    for name, buf in model.named_buffers():
        if not name.startswith(inside) and name in files:  # persistent, saved buffers
            buf.copy_(outside.get(name))
    if tied:
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    log.info("parameters outside the layers read: %.2fs", time.monotonic() - started)
    return model, StreamedLayers(model, files, arch.layers)


class _Prefetch:
    """Reads, on threads, the tensors of ``files`` whose names have no numeric part (the
    model's parameters outside its numbered layers: ``model.embed_tokens.weight``,
    ``lm_head.weight``, ``model.norm.weight``) while the caller does other work; ``get``
    waits for one (or reads a name it did not guess). What is not asked for is dropped."""

    def __init__(self, files: TensorFiles, workers: int = 8) -> None:
        self.files = files
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="gptq-read")
        names = [n for n in files if not re.search(r"(^|\.)\d+(\.|$)", n)]
        names.sort(key=lambda n: -files.entries[n].nbytes)  # the large ones first
        self.pending: dict[str, Future] = {}
        # one reader thread walks the names; each large tensor's chunks go to the pool
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="gptq-prefetch")
        for n in names:
            self.pending[n] = self.reader.submit(files.read, n, self.pool)

    def get(self, name: str) -> torch.Tensor:
        future = self.pending.pop(name, None)
        return future.result() if future is not None else self.files[name]

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.reader.shutdown(wait=True)
        self.pool.shutdown(wait=True)


def _tied_keys(model: nn.Module) -> set[str]:
    """Names of the output embedding's weight when it is the input embedding's."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}
