"""Capturing what each decoder layer receives, and running a layer on captured inputs.

Capture runs the calibration batches through the model with every decoder layer replaced
by a recorder that keeps layer 0's hidden states and every positional and keyword argument
each layer receives (attention masks and rotary embeddings can differ per layer type), and
stops the forward at the last layer. The driver and the perplexity stream both use this.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gptq_worker.arch import Architecture


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


@dataclass
class Activations:
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch, [b, seq, hidden]
    args: list[list[tuple]] = field(default_factory=list)  # per layer, per batch
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # per layer, per batch


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, passes hidden through."""

    def __init__(self, layer: nn.Module, index: int, acts: Activations, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: it must not move
        self._index, self._acts, self._last = index, acts, last

    def __getattr__(self, name: str) -> Any:  # models read e.g. ``decoder_layer.attention_type``
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._index == 0:
            self._acts.hidden.append(hidden_states.detach())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        self._acts.args[self._index].append(args)
        self._acts.kwargs[self._index].append(kwargs)
        if self._last:
            raise StopForward
        return hidden_states


@torch.no_grad()
def capture_inputs(
    model: nn.Module, arch: Architecture, batches: list[torch.Tensor], device: torch.device
) -> Activations:
    layers = model.get_submodule(arch.layers)
    originals = list(layers)
    acts = Activations(args=[[] for _ in originals], kwargs=[[] for _ in originals])
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, acts, last=i == len(originals) - 1)
    # the forward stops at the last layer: an untied lm_head (1 GB for 8B) need not travel
    head = model.get_output_embeddings()
    parent, _, child = arch.lm_head.rpartition(".")
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    if untied:
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    # the parameters' host tensors are kept and come back after capture instead of being
    # copied back (1 GB of embeddings for 8B); a Parameter object stays the same across
    # ``to`` (its ``data`` is replaced), so it is the key (kept alive here with its data)
    on_host = {id(p): (p, p.data) for p in model.parameters() if p.device.type == "cpu"}
    try:
        model.to(device)  # embeddings, rotary tables, norms: the layers are not submodules now
        for batch in batches:
            with contextlib.suppress(StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        # before the layers are back: streamed ones hold no data (meta)
        model._apply(lambda t: _back_on_host(t, on_host))
        for i, layer in enumerate(originals):
            layers[i] = layer
        if untied:
            setattr(model.get_submodule(parent) if parent else model, child, head)
    return acts


def _back_on_host(
    t: torch.Tensor, on_host: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Parameter ``t`` (moved for capture, not changed by it) as it was on the host; other
    tensors (buffers: rotary tables) copied back."""
    kept = on_host.get(id(t))
    return kept[1] if kept is not None and kept[0] is t else t.to("cpu")


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_layer(layer: nn.Module, acts: Activations, index: int) -> list[torch.Tensor]:
    """The layer's output for every captured batch, in order."""
    return [
        layer_output(layer(h, *acts.args[index][b], **acts.kwargs[index][b]))
        for b, h in enumerate(acts.hidden)
    ]


@torch.no_grad()
def forward_layer_in_place(
    layer: nn.Module, hidden: list[torch.Tensor], acts: Activations, index: int
) -> None:
    """:func:`forward_layer` over ``hidden`` (one entry per batch), each batch's output
    replacing its input as soon as it exists: one batch more, not a second copy of the
    stream, is alive at a time (2 GiB for an 8B layer over 128 x 2048 tokens)."""
    for b in range(len(hidden)):
        hidden[b] = layer_output(layer(hidden[b], *acts.args[index][b], **acts.kwargs[index][b]))
