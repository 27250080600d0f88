"""A decoder layer cut at its residual stream between attention and MLP.

True-sequential quantization runs a layer's forward once per group (q/k/v, o, gate/up,
down) for each of two streams (the partly quantized one and, for GPTAQ, the
full-precision one), and then once more with every group quantized. Run from the layer's
input each time, attention and o_proj are recomputed in passes that only need the MLP's
inputs. Once a stream's attention half is final, its hidden states can be replaced, batch
by batch and in place (no memory more), by the residual stream between the halves
(``h_mid = h + attention(h)``); later passes then run the MLP half alone. For Llama-3-8B
that is 317 instead of 414 TFLOP of forwards per layer over 128 x 2048 tokens.

The MLP half is the layer's own forward, run on ``h_mid`` with the attention module
answering zeros: ``h_mid + 0`` is ``h_mid``, and everything after it is the same
computation on the same values, so the results are the bits of the whole forward. That
holds for pre-norm layers whose attention output is added to the residual and whose
residual between the halves is the input of one module (the table below). The first
layer a run computes checks it on its first batch (the split forward against the whole
one, bit for bit); a layer that does not pass is run whole, as before.

The pass that moves the partly quantized stream to ``h_mid`` comes right after the pass
that quantizes o_proj, the attention half's last module. Its attention output is
``o_proj(x)`` for the ``x`` that pass already computed (q, k and v final by then): the
engine keeps those inputs (2 GiB over 128 x 2048 tokens of an 8B layer, freed batch by
batch; on a GPU for as many batches as its free memory holds) and the next pass replays
the attention half as ``o_proj(x)`` with o_proj's new weights, instead of recomputing q,
k, v, rotary and attention (about 18 of an 8B layer's 200 TFLOP of forwards with the
paper's settings). The first layer that replays checks it on its first batch: ``h_mid``
replayed against ``h_mid`` computed, bit for bit; a model whose attention does more
after that module fails the check and is computed as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gptq_worker.pipeline.capture import Activations, StopForward, layer_output

# model_type -> (attention module, module whose input is the residual between the halves,
# the attention module's last module: its output is the attention module's output)
SPLITS: dict[str, tuple[str, str, str]] = {
    "llama": ("self_attn", "post_attention_layernorm", "self_attn.o_proj"),
    "mistral": ("self_attn", "post_attention_layernorm", "self_attn.o_proj"),
    "qwen2": ("self_attn", "post_attention_layernorm", "self_attn.o_proj"),
    "qwen3": ("self_attn", "post_attention_layernorm", "self_attn.o_proj"),
}


class _StopAtMid(StopForward):
    pass


def _zeros(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """An attention module's answer in the MLP half: zeros (and no attention weights)."""
    if hidden_states is None:
        hidden_states = args[0]
    return torch.zeros_like(hidden_states), None


@dataclass(frozen=True)
class LayerSplit:
    attention: str
    mid: str
    output: str | None = None  # the attention half's last module; None: no replay

    @classmethod
    def for_model(cls, model: nn.Module) -> LayerSplit | None:
        names = SPLITS.get(getattr(getattr(model, "config", None), "model_type", None))
        return None if names is None else cls(*names)

    def in_attention(self, module: str) -> bool:
        """Whether ``module`` (a name inside the layer) belongs to the attention half."""
        return module.startswith(self.attention + ".")

    # No generator context managers on these paths: a StopForward raised inside one would
    # leave a reference cycle (exception, traceback, the manager's frame) that keeps the
    # forward's activations (GiBs on a GPU) alive until the cyclic collector runs.

    def run_mlp_half(self, layer: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The layer's forward on ``h_mid``: its MLP half (attention answers zeros)."""
        attention = layer.get_submodule(self.attention)
        attention.forward = _zeros  # the instance's, in front of the class's
        try:
            return layer(h, *args, **kwargs)
        finally:
            del attention.forward

    def run_to_mid(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        args: tuple,
        kwargs: dict,
        store: Callable[[torch.Tensor], None],
        stop: bool,
        output_input: torch.Tensor | None = None,
    ) -> Any:
        """The layer's forward from its input, handing ``h_mid`` to ``store`` on the way (and
        stopping there with a :class:`StopForward` if ``stop``). ``output_input``: the
        attention module answers ``output(output_input)``, its last module on the input
        that module was given before (kept from an earlier pass of the same layer, with the
        same weights before it), instead of computing."""

        def hook(_m: nn.Module, hook_args: tuple) -> None:
            store(hook_args[0].detach())
            if stop:
                raise _StopAtMid

        attention = None
        if output_input is not None:
            attention = layer.get_submodule(self.attention)
            project = layer.get_submodule(self.output)

            def replayed(*_args: Any, **_kwargs: Any) -> Any:
                return project(output_input), None

            attention.forward = replayed  # the instance's, in front of the class's
        handle = layer.get_submodule(self.mid).register_forward_pre_hook(hook)
        try:
            return layer(h, *args, **kwargs)
        finally:
            handle.remove()
            if attention is not None:
                del attention.forward

    @torch.no_grad()
    def replays(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        args: tuple,
        kwargs: dict,
        output_input: torch.Tensor,
    ) -> bool:
        """Whether the replayed attention half gives the computed one's ``h_mid`` bit for
        bit (on one batch: ``h`` the layer's input, ``output_input`` the input the output
        module got from it)."""
        if self.output is None:
            return False
        computed: list[torch.Tensor] = []
        replayed: list[torch.Tensor] = []
        try:
            with contextlib.suppress(StopForward):
                self.run_to_mid(layer, h, args, kwargs, computed.append, True)
            with contextlib.suppress(StopForward):
                self.run_to_mid(layer, h, args, kwargs, replayed.append, True, output_input)
        except Exception:  # another layout: compute the attention half
            return False
        return (
            len(computed) == len(replayed) == 1
            and computed[0].shape == replayed[0].shape
            and torch.equal(computed[0], replayed[0])
        )

    @torch.no_grad()
    def reproduces(self, layer: nn.Module, acts: Activations, index: int) -> bool:
        """Whether the two halves give the whole forward's output bit for bit on batch 0."""
        if not acts.hidden:
            return False
        h = acts.hidden[0]
        args, kwargs = acts.args[index][0], acts.kwargs[index][0]
        try:
            whole = layer_output(layer(h, *args, **kwargs))
            got: list[torch.Tensor] = []
            with contextlib.suppress(StopForward):
                self.run_to_mid(layer, h, args, kwargs, got.append, True)
            if len(got) != 1:
                return False
            split = layer_output(self.run_mlp_half(layer, got[0], args, kwargs))
        except Exception:  # another layout: run the layer whole
            return False
        return split.shape == whole.shape and torch.equal(split, whole)


def forward_from(
    layer: nn.Module,
    h: torch.Tensor,
    args: tuple,
    kwargs: dict[str, Any],
    split: LayerSplit | None,
    at_mid: bool,
    on_mid: Callable[[torch.Tensor], None] | None = None,
    stop_at_mid: bool = False,
    output_input: torch.Tensor | None = None,
) -> Any:
    """The layer on one batch from where its stream is: ``h`` is the layer's input, or
    ``h_mid`` when ``at_mid``. ``on_mid`` (from the input) is handed ``h_mid`` on the way,
    and with ``stop_at_mid`` the forward stops there (StopForward); ``output_input`` (with
    ``on_mid``): the attention half is replayed from its output module's kept input
    (:meth:`LayerSplit.run_to_mid`). The caller's hooks fire as usual, and their
    StopForward propagates."""
    if split is None:
        return layer(h, *args, **kwargs)
    if at_mid:
        return split.run_mlp_half(layer, h, args, kwargs)
    if on_mid is None:
        return layer(h, *args, **kwargs)
    return split.run_to_mid(layer, h, args, kwargs, on_mid, stop_at_mid, output_input)
