"""The fast running batch for Llama-family models: a static KV cache, fused GPTQ kernels
and CUDA graphs for decode steps.

It is longer than 400 lines because the static cache, the CUDA-graph buckets and the
fused decode step share one state and are read together.

:class:`StaticBatch` has the interface of ``batch.RunningBatch`` (prefill, join, leave,
decode, reset), so the engine's continuous batching, sampling and streaming are the same;
what differs is how a step runs:

- **KV cache.** Allocated once: ``[2, layers, rows, kv_heads, capacity, head_dim]``. Row
  ``i`` of the running batch lives in slot ``i`` (a leaving row's slot is filled by moving
  the last row into it), its token ``t`` at position ``t``. Nothing is concatenated per
  step: a decode step writes one column per row in place.
- **Forward.** Our own forward of the Llama architecture over the model's own modules and
  weights (embeddings, RMSNorm weights, RoPE frequencies of ``model.model.rotary_emb``,
  activation): q/k/v and gate/up are fused into one GPTQ matmul each (their packed
  tensors concatenated; the original modules keep views of them, so no memory is added),
  each matmul is ``kernels.gptq_triton.qmatmul`` on CUDA (the fused dequantize-and-
  multiply kernel for decode, dequantize + matmul for prefill) and the same dequantized
  weight in torch elsewhere. Attention at decode reads each row's cache up to a length
  bucket, masked per row at its own position (grouped-query attention without copying
  keys); prefill runs right-padded prompts through causal SDPA and writes their keys and
  values into their slots.
- **Flat fused step.** On a GPU the step runs flat tokens, each with a cache slot and a
  position: the decoding rows' last tokens and, beside them, whole prompts of up to
  ``STEP_PROMPT_TOKENS`` (:meth:`StaticBatch.mixed`), so a new request's prefill costs the
  running rows no step of its own; logits only for the rows and each prompt's last token.
- **CUDA graphs.** The fused step is captured once per token bucket (the torch step once
  per (row bucket, length bucket)) and replayed: tokens, positions and slots are copied
  into static buffers; padding tokens write a scratch slot (the fused step) or free slots
  (the torch step). Python then costs one replay per step instead of ~30 launches per
  layer.
- **Greedy tokens on the device.** Every step ends with the argmax of its logits in
  ``ids``; a row launched with ``fed`` set reads its input token there, so
  :meth:`StaticBatch.launch` can start step N+1 before step N's tokens reach the host
  (pinned memory, an event: :class:`Fetch`), and the engine streams step N meanwhile.

Supported: the ``model_type`` values of :data:`LLAMA_LIKE` (Llama 2/3, Mistral, Qwen2,
Qwen3: the same decoder, Qwen2 with biases on q/k/v, which the fused matmuls add, Qwen3
with per-head q/k norms, applied in torch between the q/k/v matmul and RoPE) with SiLU
MLPs, full attention in every layer that can reach past a sliding window, and the
standard module names; :func:`unsupported` says why a model is not, and the engine then
uses the model-agnostic ``RunningBatch``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from gptq_worker.kernels import decode_triton as fused
from gptq_worker.kernels import gptq_triton as kernels

log = logging.getLogger(__name__)
LENGTH_STEP = 256  # attention length buckets: multiples of this, then growing by half
# prompt tokens one fused step takes beside the decoding rows (GPTQ_SERVE_STEP_PROMPT_TOKENS)
STEP_PROMPT_TOKENS = int(os.environ.get("GPTQ_SERVE_STEP_PROMPT_TOKENS", "256"))


# model types whose decoder is Llama's, as transformers 5.17 and 5.24 write them
# (models/{mistral,qwen2}/modeling_*.py): RMSNorm, RoPE from the model's rotary module,
# grouped-query attention scaled by head_dim^-0.5, a SiLU-gated MLP; Qwen2 adds biases on
# q/k/v, Qwen3 an RMSNorm over each head of q and k before RoPE (models/qwen3/
# modeling_qwen3.py, Qwen3Attention.forward); all may use sliding-window attention, which
# this forward does not
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def _sliding_window(config) -> int | None:
    """The window of any sliding-window layer, or None if every layer attends fully."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    if getattr(config, "model_type", None) == "qwen2":
        return window if getattr(config, "use_sliding_window", False) else None
    return window  # Mistral: every layer, when the window is set


def unsupported(model) -> str | None:
    """Why :class:`StaticBatch` cannot run ``model`` (None if it can)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_LIKE:
        return f"model type {model_type!r} (only {', '.join(LLAMA_LIKE)})"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"MLP activation {act!r} (only SiLU)"
    window = _sliding_window(config)
    context = getattr(config, "max_position_embeddings", None)
    if window is not None and (context is None or window < context):
        return f"sliding-window attention (a {window}-token window, context {context})"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding with inv_freq"
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return "position-dependent RoPE scaling"
    layer = inner.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(layer.self_attn, name):
            return f"no self_attn.{name}"
    if model_type == "qwen3" and not all(
        hasattr(layer.self_attn, name) for name in ("q_norm", "k_norm")
    ):
        return "a qwen3 layer without self_attn.q_norm and k_norm"
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(layer.mlp, name):
            return f"no mlp.{name}"
    return None


class Linear:
    """One matmul of the fast forward: a (possibly fused) GPTQ layer, or dense modules."""

    def __init__(self, modules: list) -> None:
        from gptq_worker.serve.model import QuantLinear

        self.modules, self.weight, self.bias = modules, None, None
        if not all(isinstance(m, QuantLinear) for m in modules):
            return
        first = modules[0]
        if any(m.bits != first.bits or not torch.equal(m.g_idx, first.g_idx) for m in modules):
            return  # different formats or act-order permutations: run them one by one
        if len(modules) == 1:
            qweight, zeros, scales = first.qweight, first.zeros, first.scales
        else:
            qweight = torch.cat([m.qweight for m in modules], 1)
            zeros = torch.cat([m.zeros for m in modules], 1)
            scales = torch.cat([m.scales for m in modules], 1)
            start = 0
            for m in modules:  # the modules keep views: the fused copy adds no memory
                end = start + m.out_features
                m.qweight, m.zeros = qweight[:, start:end], zeros[:, start:end]
                m.scales = scales[:, start:end]
                start = end
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat(
                [
                    m.bias if m.bias is not None else scales.new_zeros(m.out_features)
                    for m in modules
                ]
            )
        self.weight = kernels.PackedWeight(qweight, zeros, scales, first.g_idx, first.bits)

    def fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The fused decode step's matmul: fp32 sums, read by the next fused kernel."""
        if self.weight is None:
            return self(x).float()
        y = kernels.fused_matmul(x, self.weight, fp32=True)
        return y if self.bias is None else y + self.bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w is None:
            return torch.cat([m(x) for m in self.modules], -1)
        if x.is_cuda and kernels.available(x):
            return kernels.qmatmul(x, w, self.bias)
        # the torch path: the fp32 weight rounded to x's dtype, as QuantLinear computes it
        y = F.linear(x, kernels.reference_weight(w, torch.float32).to(x.dtype).t())
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _Layer:
    def __init__(self, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Linear([attn.o_proj])
        self.gate_up = Linear([mlp.gate_proj, mlp.up_proj])
        self.down = Linear([mlp.down_proj])
        self.act = mlp.act_fn
        self.silu = is_silu(mlp.act_fn)
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        # Qwen3: an RMSNorm over each head of q and of k, before RoPE
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)


def is_silu(act) -> bool:
    """Whether the MLP's activation module computes SiLU (then the fused step runs the
    ``silu_mul`` kernel): asked of its values, not its class, since transformers' ``ACT2FN``
    gives its own ``SiLUActivation`` (5.17 and 5.24), not ``torch.nn.SiLU``."""
    probe = torch.linspace(-12.0, 12.0, 97)
    try:
        with torch.no_grad():
            return bool(torch.equal(act(probe), F.silu(probe)))
    except Exception:  # an activation that cannot take a CPU float tensor
        return False


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _rms(norm, h: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm, step for step."""
    eps = _eps(norm)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * x.to(h.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def length_buckets(capacity: int) -> list[int]:
    out, length = [], LENGTH_STEP
    while length < capacity:
        out.append(length)
        grow = LENGTH_STEP if length < 4 * LENGTH_STEP else length // 2
        length += -(-grow // LENGTH_STEP) * LENGTH_STEP
    return [*out, capacity]


class Fetch:
    """A launched step's greedy tokens on their way to the host (pinned memory, an event)."""

    def __init__(self, host: torch.Tensor, event) -> None:
        self.host, self.event = host, event

    def tokens(self) -> list[int]:
        """Wait for the step (only it and what came before it on the stream)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class StaticBatch:
    """The running batch in a static cache (see the module's doc)."""

    def __init__(
        self,
        model,
        device: torch.device,
        pad: int,
        rows: int,
        capacity: int,
        graphs: bool | None = None,
    ) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the static runtime cannot run this model: {reason}")
        self.model, self.device, self.pad = model, device, pad
        self.max_rows, self.capacity = rows, capacity
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.fused = (  # GPTQ_SERVE_FUSED=0: the torch step (in CUDA graphs) instead
            os.environ.get("GPTQ_SERVE_FUSED", "1") != "0"
            and device.type == "cuda"
            and kernels.triton is not None
            and model.get_input_embeddings().weight.dtype in (torch.float16, torch.bfloat16)
        )
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]
        attn = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
        dtype = self.embed.weight.dtype
        self.dtype = dtype
        rotary = inner.rotary_emb
        positions = torch.arange(capacity, device=device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(device=device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(rotary, "attention_scaling", 1.0)
        self.cos = (emb.cos() * scaling).to(dtype)
        self.sin = (emb.sin() * scaling).to(dtype)
        # one slot more than rows: the scratch row that the padding tokens of a step write
        shape = (2, len(self.layers), rows + 1, self.kv_heads, capacity, self.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.scratch = rows
        self.row_buckets = sorted({*(2**i for i in range(rows.bit_length()) if 2**i <= rows), rows})
        # token buckets of the fused step: the row buckets, then decoding rows plus prompts
        self.prompt_tokens = max(0, STEP_PROMPT_TOKENS)
        top = rows + self.prompt_tokens
        more = [t for t in range(64, top, 64) if t > rows]
        self.token_buckets = sorted({*self.row_buckets, *more, top})
        tokens = self.token_buckets[-1]
        # a step's inputs, one buffer (one copy from the host per step): tokens, positions,
        # cache slots, where a token is read from ``ids`` instead (-1: from ``tokens``),
        # and which tokens' logits come out
        self.inputs = torch.zeros((5, tokens), device=device, dtype=torch.long)
        self.tokens, self.positions, self.slot_of, self.source = self.inputs[:4]
        self.out_index = self.inputs[4, :rows]
        self.slot_of.fill_(rows)
        self.source.fill_(-1)
        # every step's greedy tokens (argmax of its logits, in the graph), one per output
        self.ids = torch.zeros(rows, device=device, dtype=torch.long)
        pin = device.type == "cuda"
        # two of each: the host fills one while the device may still read the other
        self._staging = [torch.zeros((5, tokens), dtype=torch.long, pin_memory=pin)
                         for _ in range(2)]  # fmt: skip
        self._host_ids = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self.columns = torch.arange(capacity, device=device)
        self.row_index = torch.arange(rows, device=device)
        # the fused step's attention reads each row up to its own position: no length buckets
        self.length_buckets = [capacity] if self.fused else length_buckets(capacity)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.rows: list = []

    # -- the engine's interface ------------------------------------------------------------
    @property
    def slots(self) -> int:
        return sum(r.length for r in self.rows)

    def limit(self) -> int:
        """KV slots one request may use (prompt + max_tokens)."""
        return self.capacity

    def fits(self, shapes: list[tuple[int, int]]) -> bool:
        """Whether rows of ``(length, growth)`` all fit: a slot each, each within capacity."""
        return len(shapes) <= self.max_rows and all(a + b <= self.capacity for a, b in shapes)

    def _qk_norm(self, layer: _Layer, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv`` with each head of q and k normalised by the layer's q/k norms (Qwen3),
        as transformers does before RoPE; unchanged where the layer has none."""
        if layer.q_norm is None:
            return qkv
        hd, lead = self.head_dim, qkv.shape[:-1]
        nq, nk = self.heads * hd, self.kv_heads * hd
        q = _rms(layer.q_norm, qkv[..., :nq].reshape(*lead, self.heads, hd))
        k = _rms(layer.k_norm, qkv[..., nq : nq + nk].reshape(*lead, self.kv_heads, hd))
        parts = (q.reshape(*lead, nq), k.reshape(*lead, nk), qkv[..., nq + nk :])
        return torch.cat([t.to(qkv.dtype) for t in parts], -1)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        """Run ``prompts`` into the slots after the running rows; returns their last
        positions' logits and where they start (for :meth:`join`)."""
        base = len(self.rows)
        n = len(prompts)
        if base + n > self.max_rows:
            raise RuntimeError(f"{base + n} rows do not fit {self.max_rows} slots")
        longest = max(len(p) for p in prompts)
        if longest > self.capacity:
            raise ValueError(f"a prompt of {longest} tokens exceeds the cache ({self.capacity})")
        if self.mixes(prompts, decoding=False):
            return self._flat([], prompts, base)[1], base
        ids = torch.full((n, longest), self.pad, dtype=torch.long)
        for i, p in enumerate(prompts):  # right-padded: causal attention never sees the pad
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        slots = self.row_index[base : base + n]
        cos, sin = self.cos[:longest][None, None], self.sin[:longest][None, None]
        h = self.embed(ids)
        group = self.heads // self.kv_heads
        hd = self.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms(layer.norm1, h)
            qkv = self._qk_norm(layer, layer.qkv(x))
            q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], -1)
            q = _rope(q.view(n, longest, self.heads, hd).transpose(1, 2), cos, sin)
            k = _rope(k.view(n, longest, self.kv_heads, hd).transpose(1, 2), cos, sin)
            v = v.view(n, longest, self.kv_heads, hd).transpose(1, 2)
            self.kv[0, i, slots, :, :longest] = k
            self.kv[1, i, slots, :, :longest] = v
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            h = h + layer.o(a.transpose(1, 2).reshape(n, longest, self.heads * hd))
            x = _rms(layer.norm2, h)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(layer.act(gate) * up)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        h = h[torch.arange(n, device=self.device), last]
        return self.lm_head(_rms(self.final_norm, h)), base

    def mixes(self, prompts: list[list[int]], decoding: bool = True) -> bool:
        """Whether one fused step can take ``prompts`` (beside the decoding rows, if
        ``decoding``): the fused kernels run, and their tokens fit the step's budget."""
        rows = len(self.rows) if decoding else 0
        return (
            self.fused
            and len(self.rows) + len(prompts) <= self.max_rows
            and sum(map(len, prompts)) <= self.prompt_tokens
            and rows + sum(map(len, prompts)) <= self.token_buckets[-1]
        )

    @torch.inference_mode()
    def mixed(self, prompts: list[list[int]]):
        """One fused step for the decoding rows and the prefill of ``prompts`` (into the
        slots after the rows), so that a new request costs the running ones no step of its
        own: returns the rows' logits (as :meth:`decode`), the prompts' last positions'
        logits and where they start (as :meth:`prefill`). Check :meth:`mixes` first."""
        base = len(self.rows)
        decode, new = self._flat(self.rows, prompts, base)
        for r in self.rows:
            r.length += 1
            r.fed = None
        return decode, new, base

    def _flat(self, rows: list, prompts: list[list[int]], base: int, fetch: bool = False):
        """The fused step over a flat list of tokens: each decoding row's last token (slot
        ``i``, at its length) and every token of each prompt (slot ``base + j``, positions
        0..); padding tokens write the scratch slot. Returns the logits of the rows and of
        the prompts' last tokens, or (``fetch``) a :class:`Fetch` of their greedy tokens."""
        n = len(rows)
        tokens = [r.token for r in rows]
        positions = [r.length for r in rows]
        sources = [-1 if r.fed is None else r.fed for r in rows]
        slots = list(range(n))
        outputs = list(range(n))
        for j, p in enumerate(prompts):
            slots += [base + j] * len(p)
            positions += range(len(p))
            tokens += p
            outputs.append(len(tokens) - 1)
        count = len(tokens)
        bucket = next(b for b in self.token_buckets if b >= count) if self.graphs else count
        outs = len(outputs)
        self._upload(tokens, positions, slots, sources, outputs)
        if self.graphs:
            graph, out = self._graph(bucket, self.length_buckets[-1])
            graph.replay()
        else:
            out = self._fused_step(bucket)
        if fetch:
            return self._fetch(outs)
        logits = out[:outs].clone()
        return logits[:n], logits[n:]

    def _upload(self, tokens, positions, slots, sources, outputs) -> None:
        """Copy a step's inputs to the device in one transfer (padding filled in)."""
        width = self.inputs.shape[1]
        stage = self._staging[self._flip]
        self._flip ^= 1
        stage.copy_(torch.tensor([
            tokens + [self.pad] * (width - len(tokens)),
            [*positions, *[0] * (width - len(positions))],
            slots + [self.scratch] * (width - len(slots)),
            sources + [-1] * (width - len(sources)),
            outputs + [0] * (width - len(outputs)),
        ]))  # fmt: skip
        self.inputs.copy_(stage, non_blocking=True)

    def _fetch(self, count: int) -> Fetch:
        """Start copying the step's first ``count`` greedy tokens to the host."""
        host = self._host_ids[self._flip][:count]
        host.copy_(self.ids[:count], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return Fetch(host, event)

    @torch.inference_mode()
    def launch(self, prompts: list[list[int]] = ()) -> tuple[Fetch, int]:
        """One step for every row (and, on the fused step, the prefill of ``prompts`` into
        the slots after the rows: check :meth:`mixes`), not waited for: returns a
        :class:`Fetch` of the greedy tokens of the rows then of the prompts, and where the
        prompts start. A row whose ``fed`` is set takes its input from the previous step's
        greedy tokens on the device, so the next step can be launched before this one's
        tokens reach the host; afterwards every row's ``fed`` points at this step's."""
        base = len(self.rows)
        if self.fused:
            fetch = self._flat(self.rows, list(prompts), base, fetch=True)
        elif prompts:
            raise ValueError("only the fused step prefills beside the decoding rows")
        else:
            fetch = self._decode(fetch=True)
        for i, r in enumerate(self.rows):
            r.length += 1
            r.fed = i
        return fetch, base

    def join(self, rows: list, start: int, picked: list[int]) -> None:
        """Add ``rows`` (prompts ``picked`` of the :meth:`prefill` that began at ``start``)."""
        for t, p in enumerate(picked):  # p >= t: moving down in order overwrites nothing
            if p != t:
                self._move(start + p, start + t, rows[t].length)
        self.rows.extend(rows)

    def leave(self, gone: list) -> None:
        """Drop ``gone``; the last row moves into each slot freed."""
        for row in gone:
            i = self.rows.index(row)
            last = len(self.rows) - 1
            if i != last:
                self._move(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def reset(self) -> None:
        self.rows = []

    def _move(self, source: int, target: int, length: int) -> None:
        self.kv[:, :, target, :, :length] = self.kv[:, :, source, :, :length]

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns ``[rows, vocab]``."""
        logits = self._flat(self.rows, [], len(self.rows))[0] if self.fused else self._decode()
        for r in self.rows:
            r.length += 1
            r.fed = None  # the caller samples each row's next token from the logits
        return logits

    def _decode(self, fetch: bool = False):
        """The torch step (row buckets by length buckets) for every row."""
        n = len(self.rows)
        longest = max(r.length for r in self.rows) + 1
        length = next(b for b in self.length_buckets if b >= longest)
        rows = next(b for b in self.row_buckets if b >= n) if self.graphs else n
        self._upload(
            [r.token for r in self.rows],
            [r.length for r in self.rows],
            list(range(n)),
            [-1 if r.fed is None else r.fed for r in self.rows],
            [],
        )
        if self.graphs:
            graph, out = self._graph(rows, length)
            graph.replay()
        else:
            out = self._run(rows, length)
        return self._fetch(n) if fetch else out[:n].clone()

    # -- decode step ---------------------------------------------------------------------
    def _run(self, rows: int, length: int) -> torch.Tensor:
        return self._fused_step(rows) if self.fused else self._step(rows, length)

    def _fused_step(self, rows: int) -> torch.Tensor:
        """The forward of ``rows`` flat tokens (decoding rows' and prompts', each with its
        cache slot and position) in fused kernels (``kernels/decode_triton.py``): per layer
        add+norm, qkv, rope+cache write, attention, o, add+norm, gate/up, silu*up, down;
        logits of the tokens ``out_index`` names (at most one a slot)."""
        positions = self.positions[:rows]
        slots = self.slot_of[:rows]
        hd = self.head_dim
        h = self.embed(self._fed(rows))
        x = torch.empty_like(h)
        q = torch.empty((rows, self.heads, hd), device=self.device, dtype=self.dtype)
        a = torch.empty((rows, self.heads * hd), device=self.device, dtype=self.dtype)
        d = None
        for i, layer in enumerate(self.layers):
            fused.add_rms(h, d, layer.norm1.weight, _eps(layer.norm1), x)
            qkv = self._qk_norm(layer, layer.qkv.fp32(x))
            keys, values = self.kv[0, i], self.kv[1, i]
            fused.rope_kv(qkv, q, keys, values, self.cos, self.sin, positions, self.heads,
                          self.kv_heads, slots)  # fmt: skip
            fused.attention(q, keys, values, positions, a, self.scale, slots)
            fused.add_rms(h, layer.o.fp32(a), layer.norm2.weight, _eps(layer.norm2), x)
            gate_up = layer.gate_up.fp32(x)
            if layer.silu:
                act = torch.empty((rows, gate_up.shape[1] // 2), device=self.device,
                                  dtype=self.dtype)  # fmt: skip
                fused.silu_mul(gate_up, act)
            else:
                gate, up = gate_up.to(self.dtype).chunk(2, dim=-1)
                act = layer.act(gate) * up
            d = layer.down.fp32(act)
        fused.add_rms(h, d, self.final_norm.weight, _eps(self.final_norm), x)
        return self._greedy(self.lm_head(x[self.out_index[: min(rows, self.max_rows)]]))

    def _fed(self, rows: int) -> torch.Tensor:
        """The step's input tokens: ``tokens``, or the previous step's greedy token where
        ``source`` names one (the rows :meth:`launch` fed on the device)."""
        source = self.source[:rows]
        return torch.where(source >= 0, self.ids[source.clamp(min=0)], self.tokens[:rows])

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the greedy token of every output in ``ids`` (the next step may read them,
        the host fetches them); returns ``logits``."""
        self.ids[: logits.shape[0]].copy_(logits.argmax(-1))
        return logits

    def _step(self, rows: int, length: int) -> torch.Tensor:
        """The decode forward for the first ``rows`` slots, attention over ``length``."""
        tokens, positions = self._fed(rows), self.positions[:rows]
        hd, group = self.head_dim, self.heads // self.kv_heads
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        index = self.row_index[:rows]
        hidden = self.columns[:length][None, :] > positions[:, None]
        bias = torch.zeros((rows, length), device=self.device, dtype=torch.float32)
        bias = bias.masked_fill(hidden, float("-inf"))[:, None, None, :]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = _rms(layer.norm1, h)
            qkv = self._qk_norm(layer, layer.qkv(x))
            q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], -1)
            q = _rope(q.view(rows, self.heads, hd), cos, sin)
            k = _rope(k.view(rows, self.kv_heads, hd), cos, sin)
            keys, values = self.kv[0, i], self.kv[1, i]
            keys[index, :, positions] = k
            values[index, :, positions] = v.view(rows, self.kv_heads, hd)
            keys, values = keys[:rows, :, :length], values[:rows, :, :length]
            q = q.view(rows, self.kv_heads, group, hd)
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale + bias
            p = torch.softmax(scores, dim=-1).to(self.dtype)
            a = torch.matmul(p, values).reshape(rows, self.heads * hd)
            h = h + layer.o(a)
            x = _rms(layer.norm2, h)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(layer.act(gate) * up)
        return self._greedy(self.lm_head(_rms(self.final_norm, h)))

    def _graph(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            saved = self.ids.clone()  # the warm-up runs the step: its tokens are not fed
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernels)
                self._run(rows, length)
            self.ids.copy_(saved)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._run(rows, length)
            self._graphs[key] = (graph, out)
        return self._graphs[key]

    @torch.inference_mode()
    def self_check(self, prompt: list[int]) -> dict:
        """One decode step after ``prompt`` (in slot 0; call only with no rows running) by
        the path that serves (fused kernels in a CUDA graph on a GPU) and by the torch
        step: how far apart their logits are."""
        if self.rows:
            raise RuntimeError("self_check needs an idle batch")
        self.prefill([prompt])
        self.source.fill_(-1)
        self.tokens[0] = prompt[-1]
        self.positions[0] = len(prompt)
        reference = self._step(1, next(b for b in length_buckets(self.capacity)
                                       if b > len(prompt))).float()  # fmt: skip
        rows = self.row_buckets[0]
        if self.fused:
            self.slot_of[:rows] = self.scratch
            self.slot_of[0] = 0
            self.out_index.zero_()
        if self.graphs:
            graph, out = self._graph(rows, self.length_buckets[-1])
            graph.replay()
            got = out[:1].float()
        else:
            got = self._run(rows, self.length_buckets[-1])[:1].float()
        rel = ((got - reference).norm() / reference.norm()).item()
        return {
            "decode_step_vs_torch_rel_err": float(f"{rel:.2e}"),
            "decode_step_argmax_equal": bool(got.argmax() == reference.argmax()),
        }

    @torch.inference_mode()
    def warm(self, capture: bool = True) -> dict:
        """Tune the kernels for this model's layer shapes and capture every decode graph
        (so that no request pays for either); returns what was chosen."""
        chosen: dict = {}
        if self.device.type == "cuda" and kernels.triton is not None:
            weights = [
                lin.weight
                for layer in self.layers
                for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
                if lin.weight is not None
            ]
            chosen = kernels.tune(weights, self.dtype)
            # compile the eager prefill's kernels too (prompts beyond the fused step's
            # budget; fused up to 64 rows, dequantize + matmul above)
            fused, self.fused = self.fused, False
            for n in (1, 10, 24, 40, 100):
                if n <= self.capacity and not self.rows:
                    self.prefill([[self.pad] * n])
            self.fused = fused
        if self.graphs and capture:
            # padding writes the scratch slot (fused) or free slots at position 0 (torch)
            self.positions.zero_()
            self.slot_of.fill_(self.scratch)
            self.source.fill_(-1)
            self.out_index.zero_()
            buckets = self.token_buckets if self.fused else self.row_buckets
            for rows in buckets:
                for length in self.length_buckets:
                    self._graph(rows, length)
            torch.cuda.synchronize(self.device)
        return chosen
