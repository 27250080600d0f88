"""What each group's solve needs from a layer's forward passes: its Hessian, and for GPTAQ
the full-precision inputs and the cross term.

One pass over the captured batches per true-sequential step; hooks on each group's first
module fold its inputs into the accumulators and stop the forward at the last group.

GPTAQ pairs, batch by batch, the inputs a head module gets in the partly quantized layer
(``X~``) with the inputs it gets in the full-precision model (``X``). ``X`` is not kept for
the whole layer (for an 8B layer that was 2 GiB per head and 7.5 GiB for ``down_proj``,
most of GPTAQ's GPU memory): :class:`FullPrecisionStream` runs an unmodified copy of the
layer on the full-precision hidden states of one batch just before the quantized forward
of the same batch needs them. The values are the same as a stored ``X`` (same weights,
same inputs, same batch shapes), so the Hessians, and so the checkpoint, do not change.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from gptq_worker.arch import features
from gptq_worker.pipeline.capture import (
    Activations,
    StopForward,
    forward_layer_in_place,
    layer_output,
)
from gptq_worker.pipeline.mover import Phases
from gptq_worker.pipeline.split import LayerSplit, forward_from
from gptq_worker.quant.hessian import AsymmetricHessian, Hessian


class FullPrecisionStream:
    """GPTAQ's full-precision stream: the hidden states the unquantized model would have.

    Per layer: :meth:`begin` with the layer still holding its original weights; then either
    :meth:`head_inputs` once per batch and pass (the last pass with ``complete=True``, which
    also moves that batch's hidden states on through the layer), or :meth:`advance` alone
    (a resumed layer, or one with nothing to quantize); then :meth:`end`.

    With ``split`` (``split.py``) a pass with ``to_mid`` also leaves the stream at the
    residual between attention and MLP, and later passes of the layer run its MLP half only.
    """

    def __init__(
        self, hidden: list[torch.Tensor], acts: Activations, split: LayerSplit | None = None
    ) -> None:
        self.hidden = list(hidden)  # per batch; replaced in place as batches move on
        self.acts = acts  # the arguments (masks, rotary tables) do not depend on weights
        self.split = split
        self.original: nn.Module | None = None
        self.index = -1
        self.advanced = False
        self.at_mid = False  # the stream holds the layer's h_mid, not its input

    def begin(self, layer: nn.Module, index: int, copy_weights: bool) -> None:
        """``copy_weights``: the layer is about to be quantized, so keep an unmodified copy."""
        self.original = copy.deepcopy(layer) if copy_weights else layer
        self.index = index
        self.advanced = False
        self.at_mid = False

    @torch.no_grad()
    def head_inputs(
        self, b: int, heads: list[str], complete: bool, to_mid: bool = False
    ) -> dict[str, torch.Tensor]:
        """The inputs of each head module for batch ``b``; with ``complete`` the forward runs
        to the end and batch ``b`` of the stream becomes the layer's output. ``to_mid``
        (with a split, from the layer's input): batch ``b`` becomes ``h_mid`` instead, and
        once the last batch has, the stream is at the middle of the layer."""
        got: dict[str, torch.Tensor] = {}
        to_mid = to_mid and self.split is not None and not self.at_mid
        stop = heads[-1] if heads and not complete else None
        stop_at_mid = False
        if to_mid and stop is not None and self.split.in_attention(stop):
            stop, stop_at_mid = None, True  # on past the last head, up to h_mid
        handles = []
        for head in heads:

            def hook(_m: nn.Module, args: tuple, head: str = head) -> None:
                got[head] = args[0].detach()
                if head == stop:
                    raise StopForward

            handles.append(self.original.get_submodule(head).register_forward_pre_hook(hook))
        i = self.index

        def on_mid(t: torch.Tensor) -> None:
            self.hidden[b] = t

        try:
            with contextlib.suppress(StopForward):
                out = forward_from(
                    self.original, self.hidden[b], self.acts.args[i][b], self.acts.kwargs[i][b],
                    self.split, self.at_mid, on_mid if to_mid else None, stop_at_mid,
                )  # fmt: skip
                self.hidden[b] = layer_output(out)
        finally:
            for handle in handles:
                handle.remove()
        if b == len(self.hidden) - 1:
            if complete:
                self.advanced = True
            elif to_mid:
                self.at_mid = True
        return got

    @torch.no_grad()
    def advance(self) -> None:
        """Move every batch on through the layer (unless the last pass already did)."""
        if not self.advanced:
            if self.at_mid:
                i = self.index
                for b, h in enumerate(self.hidden):
                    out = forward_from(
                        self.original, h, self.acts.args[i][b], self.acts.kwargs[i][b],
                        self.split, True,
                    )  # fmt: skip
                    self.hidden[b] = layer_output(out)
            else:
                forward_layer_in_place(self.original, self.hidden, self.acts, self.index)
            self.advanced = True

    def end(self) -> None:
        self.advance()
        self.original = None


@torch.no_grad()
def collect_hessians(
    layer: nn.Module,
    groups: list[list[str]],
    acts: Activations,
    index: int,
    device: torch.device,
    precision: str,
    phases: Phases,
    fp_stream: FullPrecisionStream | None = None,
    complete: bool = False,
    split: LayerSplit | None = None,
    at_mid: bool = False,
    to_mid: bool = False,
    fp_to_mid: bool = False,
    keep: tuple[str, list[torch.Tensor | None], int] | None = None,
    replay: list[torch.Tensor | None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """One fp32 Hessian per group (keyed by its first module), from one pass over the batches.

    The pass stops at the last group's first module: nothing after it is computed. With
    ``fp_stream`` (GPTAQ) every group also gets the cross term ``dXXT``, from the
    full-precision inputs of each batch computed just before it; ``complete`` (the layer's
    last pass) lets that stream's forward run through the whole layer. Otherwise the
    cross term's slot is None.

    With ``split`` (``split.py``): ``at_mid``, ``acts.hidden`` holds the layer's ``h_mid``
    and only the MLP half runs; ``to_mid``, each batch of ``acts.hidden`` is replaced by its
    ``h_mid`` on the way (the pass's groups must all be in the MLP half, so the attention
    half is final). ``fp_to_mid`` is :meth:`FullPrecisionStream.head_inputs`'s ``to_mid``.
    ``keep=(head, kept, n)``: the inputs of that head module are appended to ``kept``,
    batch by batch, for the first ``n`` batches (None for the others); ``replay`` (with
    ``to_mid``): such a list from the pass before, each batch's attention half replayed
    from its entry (``split.py``; computed where it is None), the entry dropped once used.
    """
    hessians: dict[str, Hessian] = {}
    handles = []
    heads = [group[0] for group in groups]
    fp_inputs: dict[str, torch.Tensor] = {}  # the batch being run, for the hooks
    for g, head in enumerate(heads):
        in_features, _ = features(layer.get_submodule(head))
        kind = Hessian if fp_stream is None else AsymmetricHessian
        hessians[head] = kind(in_features, device, precision)

        def hook(
            _module: nn.Module, inputs: tuple, head: str = head, stop: bool = g == len(groups) - 1
        ) -> None:
            if keep is not None and head == keep[0]:
                keep[1].append(inputs[0] if len(keep[1]) < keep[2] else None)
            with phases("hessian"):
                if fp_stream is None:
                    hessians[head].add(inputs[0])
                else:
                    hessians[head].add_pair(inputs[0], fp_inputs.pop(head))
            if stop:
                raise StopForward

        handles.append(layer.get_submodule(head).register_forward_pre_hook(hook))
    try:
        with phases("forward+hessian"):
            for b, h in enumerate(acts.hidden):
                if fp_stream is not None:
                    fp_inputs.update(fp_stream.head_inputs(b, heads, complete, fp_to_mid))

                def on_mid(t: torch.Tensor, b: int = b) -> None:
                    acts.hidden[b] = t

                kept = None
                if replay is not None:
                    kept, replay[b] = replay[b], None  # freed as the batch moves on
                with contextlib.suppress(StopForward):
                    forward_from(
                        layer, h, acts.args[index][b], acts.kwargs[index][b], split, at_mid,
                        on_mid if to_mid and not at_mid else None, output_input=kept,
                    )  # fmt: skip
                del kept
    finally:
        for handle in handles:
            handle.remove()
    return {
        head: (acc.result(), acc.cross_result() if fp_stream is not None else None)
        for head, acc in hessians.items()
    }
