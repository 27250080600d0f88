"""Work directory of a run: finished layers on disk, so a killed run resumes where it stopped.

After each decoder layer the packed tensors of its modules go to ``layer-NNNNN.safetensors``
and ``state.json`` records how many layers are done, under a fingerprint of everything
that decides the result (model, settings, calibration tokens). A run with another
fingerprint starts over. Resuming replays the finished layers' forwards with their
dequantized weights, which reproduces the inputs of the next layer exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptq_worker.format.tensorfiles import TensorFiles

log = logging.getLogger(__name__)


class WorkState:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory
        self.fingerprint = fingerprint
        self._state_file = directory / "state.json"
        self.layers_done = 0
        self.losses: dict[str, dict[str, float]] = {}

    def open(self) -> int:
        """Load earlier progress with the same fingerprint; returns layers already done."""
        if self._state_file.exists():
            saved = json.loads(self._state_file.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.layers_done = int(saved["layers_done"])
                self.losses = saved.get("losses", {})
                return self.layers_done
            log.warning(
                "work directory %s holds a run with other settings; starting over", self.dir
            )
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._write()
        return 0

    def save_layer(
        self, index: int, tensors: dict[str, torch.Tensor], losses: dict[str, dict[str, float]]
    ) -> None:
        path = self._layer_file(index)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        self.layers_done = index + 1
        self.losses.update(losses)
        self._write()

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._layer_file(index)))

    def packed(self) -> TensorFiles:
        """Every saved layer's tensors, each read from disk when asked for."""
        return TensorFiles(sorted(self.dir.glob("layer-*.safetensors")))

    def layer_file(self, index: int) -> Path:
        return self._layer_file(index)

    def _layer_file(self, index: int) -> Path:
        return self.dir / f"layer-{index:05d}.safetensors"

    def _write(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "fingerprint": self.fingerprint,
                    "layers_done": self.layers_done,
                    "losses": self.losses,
                }
            )
        )
        os.replace(tmp, self._state_file)
