"""What each group's solve needs from a layer's forward passes: its Hessian, and for GPTAQ
the full-precision inputs and the cross term.

One pass over the captured batches per true-sequential step; hooks on each group's first
module fold its inputs into the accumulators and stop the forward at the last group.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gptq_worker.arch import features
from gptq_worker.pipeline.capture import Activations, StopForward, forward_layer
from gptq_worker.pipeline.mover import Phases
from gptq_worker.quant.hessian import AsymmetricHessian, Hessian


@torch.no_grad()
def collect_hessians(
    layer: nn.Module,
    groups: list[list[str]],
    acts: Activations,
    index: int,
    device: torch.device,
    precision: str,
    phases: Phases,
    fp_inputs: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """One fp32 Hessian per group (keyed by its first module), from one pass over the batches.

    The pass stops at the last group's first module: nothing after it is computed. With
    ``fp_inputs`` (GPTAQ: each head's full-precision inputs, per batch) every group also
    gets the cross term ``dXXT``; otherwise its slot is None.
    """
    hessians: dict[str, Hessian] = {}
    handles = []
    batch = [0]  # the batch being run, for the hooks
    for g, group in enumerate(groups):
        head = group[0]
        in_features, _ = features(layer.get_submodule(head))
        kind = Hessian if fp_inputs is None else AsymmetricHessian
        hessians[head] = kind(in_features, device, precision)

        def hook(
            _module: nn.Module, inputs: tuple, head: str = head, stop: bool = g == len(groups) - 1
        ) -> None:
            with phases("hessian"):
                if fp_inputs is None:
                    hessians[head].add(inputs[0])
                else:
                    hessians[head].add_pair(inputs[0], fp_inputs[head][batch[0]])
            if stop:
                raise StopForward

        handles.append(layer.get_submodule(head).register_forward_pre_hook(hook))
    try:
        with phases("forward+hessian"):
            for b, h in enumerate(acts.hidden):
                batch[0] = b
                with contextlib.suppress(StopForward):
                    layer(h, *acts.args[index][b], **acts.kwargs[index][b])
    finally:
        for handle in handles:
            handle.remove()
    return {
        head: (acc.result(), acc.cross_result() if fp_inputs is not None else None)
        for head, acc in hessians.items()
    }


@torch.no_grad()
def full_precision_pass(
    layer: nn.Module, heads: list[str], acts: Activations, fp_hidden: list[torch.Tensor], index: int
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """GPTAQ's full-precision stream through one layer that still has its original weights.

    Returns each head module's inputs per batch (the ``X`` of ``||Q X~ - W X||``) and the
    layer's outputs, the next layer's full-precision inputs. The arguments (masks, rotary
    tables) are the quantized stream's: they do not depend on the weights.
    """
    inputs: dict[str, list[torch.Tensor]] = {head: [] for head in heads}

    def hook(_module: nn.Module, args: tuple, head: str) -> None:
        inputs[head].append(args[0].detach())

    handles = [
        layer.get_submodule(head).register_forward_pre_hook(
            lambda m, a, head=head: hook(m, a, head)
        )
        for head in heads
    ]
    try:
        outputs = forward_layer(layer, Activations(fp_hidden, acts.args, acts.kwargs), index)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs
