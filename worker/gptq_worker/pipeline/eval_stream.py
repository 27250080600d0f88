"""Perplexity before and after quantization, measured inside the layer-by-layer pass.

Held-out windows travel through each decoder layer twice while it is on the accelerator:
once with its original weights (before quantizing it) and once with its quantized
weights, so a model larger than the accelerator is scored without loading it whole. The
result equals what ``gptq-worker eval`` computes on the same windows (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gptq_worker.arch import Architecture
from gptq_worker.eval.perplexity import window_nll
from gptq_worker.pipeline.capture import Activations, capture_inputs, forward_layer


@dataclass
class EvalStreams:
    ids: list[torch.Tensor]  # per batch, [b, seqlen]
    before: Activations
    after: Activations
    ppl_before: float | None = None
    ppl_after: float | None = None

    @classmethod
    def capture(
        cls, model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device
    ) -> EvalStreams:
        batches = list(windows.split(1))
        before = capture_inputs(model, arch, batches, device)
        after = Activations(hidden=list(before.hidden), args=before.args, kwargs=before.kwargs)
        return cls(batches, before, after)

    def before_layer(self, layer: nn.Module, index: int) -> None:
        self.before.hidden = forward_layer(layer, self.before, index)

    def after_layer(self, layer: nn.Module, index: int) -> None:
        self.after.hidden = forward_layer(layer, self.after, index)

    @torch.no_grad()
    def perplexity(
        self, model: nn.Module, arch: Architecture, device: torch.device, stream: Activations
    ) -> float:
        """Final norm and lm_head (as they are now) over a stream's last hidden states."""
        norm = model.get_submodule(arch.final_norm).to(device)
        head = model.get_submodule(arch.lm_head).to(device)
        cap = getattr(model.config, "final_logit_softcapping", None)
        nll, count = 0.0, 0
        for x, h in zip(self.ids, stream.hidden, strict=True):
            logits = head(norm(h))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            nll += window_nll(logits, x.to(device))
            count += x.shape[0] * (x.shape[1] - 1)
        norm.to("cpu")
        head.to("cpu")
        return math.exp(nll / count)
