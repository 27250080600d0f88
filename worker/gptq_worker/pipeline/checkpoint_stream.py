"""The checkpoint's shards written while the layers are still being quantized.

:func:`~gptq_worker.format.checkpoint.write_checkpoint` writes every tensor after the last
layer: the embeddings, then each layer's packed modules and norms, then the final norm and
``lm_head`` (5.7 GB for an 8B model, seconds of a run's end). A streamed run
(``source.py``) finishes its layers in that same order, so here a thread writes the
embeddings at once and each layer's tensors as soon as the layer is finished and saved,
through the same :class:`~gptq_worker.format.checkpoint.ShardWriter`: the files are the
bytes ``write_checkpoint`` writes (tested), and only what follows the layers is left for
the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from gptq_worker.format.checkpoint import (
    ShardWriter,
    check_all_written,
    parse_size,
    quantized_prefixes,
    state_items,
)
from gptq_worker.format.tensorfiles import TensorFiles


class CheckpointStream:
    """Writes a streamed run's checkpoint shards into ``directory`` as layers finish.

    :meth:`start` once the calibration inputs are captured (the embeddings are back on the
    CPU), :meth:`layer_released` from the driver after each layer is saved and released,
    :meth:`finish` after the last layer (and lm_head), :meth:`abort` on failure.
    """

    def __init__(self, directory: Path, max_shard_size: str) -> None:
        self.directory = directory
        self.max_bytes = parse_size(max_shard_size)
        self._cond = threading.Condition()
        self._released = 0
        self._aborted = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._writer: ShardWriter | None = None
        self._seen: set[tuple[int, int]] = set()
        self._written: dict[str, object] = {}
        self.started = False

    def start(self, model: nn.Module, layers_path: str, layer_file: Callable[[int], Path]) -> bool:
        """Start writing; False (and nothing started) when the model's state_dict does not
        hold the layers as one run of keys in layer order, which the stream relies on."""
        layers = model.get_submodule(layers_path)
        state = model.state_dict()
        keys = list(state)
        inside = [i for i, k in enumerate(keys) if k.startswith(f"{layers_path}.")]
        if not inside:
            return False
        first, last = inside[0], inside[-1]
        expected = [
            k
            for i, layer in enumerate(layers)
            for k in layer.state_dict(prefix=f"{layers_path}.{i}.")
        ]
        if keys[first : last + 1] != expected:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = ShardWriter(self.directory, self.max_bytes)
        before = state_items(((k, state[k]) for k in keys[:first]), {}, self._seen)
        del state
        self._layers_path = layers_path
        self._last_key = keys[last]
        self._thread = threading.Thread(
            target=self._run,
            args=(before, layers, layer_file),
            name="gptq-checkpoint-writer",
            daemon=True,
        )
        self._thread.start()
        self.started = True
        return True

    def layer_released(self, index: int) -> None:
        """Layer ``index`` is saved and off the device: its tensors can be written."""
        with self._cond:
            self._released = max(self._released, index + 1)
            self._cond.notify_all()

    def _run(self, before: dict, layers: nn.ModuleList, layer_file: Callable[[int], Path]):
        try:
            self._add(before)
            for i, layer in enumerate(layers):
                with self._cond:
                    self._cond.wait_for(lambda i=i: self._released > i or self._aborted)
                    if self._aborted:
                        return
                packed = TensorFiles([layer_file(i)])
                prefix = f"{self._layers_path}.{i}."
                self._add(state_items(layer.state_dict(prefix=prefix).items(), packed, self._seen))
        except BaseException as err:  # re-raised by finish
            self._error = err

    def _add(self, items: dict) -> None:
        for key, item in items.items():
            self._writer.add(key, item)
            self._written[key] = item

    def finish(self, model: nn.Module, packed: Mapping[str, torch.Tensor]) -> None:
        """Write what follows the layers (``packed`` holds every packed tensor, lm_head's
        too) and name the shards."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        state = model.state_dict()
        keys = list(state)
        after = keys[keys.index(self._last_key) + 1 :]
        self._add(state_items(((k, state[k]) for k in after), packed, self._seen))
        check_all_written(quantized_prefixes(packed), self._written)
        self._writer.finish()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
