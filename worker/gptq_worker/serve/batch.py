"""The running batch of ``gptq-worker serve``: rows that join and leave at any decode step,
sharing one left-padded KV cache.

Layout: every layer's keys and values are ``[rows, heads, width, head_dim]`` and each row's
tokens sit at the right end of its row, after ``width - length`` padding columns that the
attention mask hides. A decode step appends one column for every row. New rows are
prefilled on their own (their own, left-padded cache) and then joined: both caches are
padded on the left to the wider one and stacked. A row that finishes is dropped, and the
leading columns that are now padding in every remaining row are cut, so ``width`` is always
the longest row's length and the cache holds ``rows * width`` token slots.

:func:`peak_slots` bounds the slots a set of rows will ever need if each runs to its
``max_tokens`` (the engine admits a request only while that bound fits the KV budget, so a
running request is never preempted); it counts the padding, which is the price of this
layout against a paged one.

This is the model-agnostic path: any transformers causal LM that accepts left padding
(``attention_mask`` and ``position_ids``) and a ``DynamicCache`` runs in it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    """A request in the running batch."""

    request: Any  # generate.Request
    generator: torch.Generator | None
    stream: Any  # text.TextStream
    length: int = 0  # tokens in the KV cache
    count: int = 0  # tokens generated
    token: int = 0  # the last token sampled: the input of the next step
    done: bool = field(default=False)
    # StaticBatch.launch: where on the device the step in flight leaves this row's next
    # input token (its greedy argmax), not yet known here; None: ``token`` is the input
    fed: int | None = None

    @property
    def growth(self) -> int:
        """KV entries this row may still add (one per token still to generate)."""
        return max(0, self.request.sampling.max_tokens - self.count)


def peak_slots(rows: list[tuple[int, int]]) -> int:
    """The most KV slots that rows of ``(length now, growth left)`` occupy together in the
    left-padded layout, if none stops early: at step ``k`` the rows with ``growth >= k``
    remain, each padded to the longest, ``length + k``. The maximum lies where a row ends."""
    peak, longest = 0, 0
    ordered = sorted(rows, key=lambda r: -r[1])
    for i, (length, growth) in enumerate(ordered):
        longest = max(longest, length)
        if i + 1 < len(ordered) and ordered[i + 1][1] == growth:
            continue  # rows that end together are counted at once
        # at k = growth the rows ordered[: i + 1] remain, the widest at longest + growth
        peak = max(peak, (i + 1) * (longest + growth))
    return peak


def _layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


class RunningBatch:
    def __init__(self, model, device: torch.device, pad: int) -> None:
        self.model, self.device, self.pad = model, device, pad
        self.rows: list[Row] = []
        self.cache = None  # a DynamicCache once a row has joined
        self.width = 0
        params = inspect.signature(model.forward).parameters
        self._last_logits_only = "logits_to_keep" in params
        # transformers 5.x renamed past_key_values to cache (the old name goes in 5.40)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def slots(self) -> int:
        return len(self.rows) * self.width

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        extra[self._cache_arg] = cache
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra
        )
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        """Run new prompts (left-padded together) in a cache of their own: returns the
        logits of each one's last position and that cache, for :meth:`join`."""
        from transformers import DynamicCache

        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        return logits, cache

    def join(self, rows: list[Row], cache, picked: list[int]) -> None:
        """Add ``rows`` (rows ``picked`` of a :meth:`prefill` cache) to the batch."""
        if not rows:
            return
        width = max(r.length for r in rows)
        index = torch.tensor(picked, device=self.device)
        for layer in _layers(cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, -width:]
            layer.values = layer.values.index_select(0, index)[:, :, -width:]
        if self.cache is None:
            self.cache, self.width = cache, width
        else:
            merged = max(self.width, width)
            for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
                mine.keys = torch.cat(
                    [_pad_left(mine.keys, merged), _pad_left(theirs.keys, merged)]
                )
                mine.values = torch.cat(
                    [_pad_left(mine.values, merged), _pad_left(theirs.values, merged)]
                )
            self.width = merged
        self.rows.extend(rows)

    def leave(self, gone: list[Row]) -> None:
        """Drop finished rows and the columns that are padding for every row left."""
        if not gone:
            return
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.reset()
            return
        width = max(r.length for r in self.rows)
        index = torch.tensor(keep, device=self.device)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, self.width - width :]
            layer.values = layer.values.index_select(0, index)[:, :, self.width - width :]
        self.width = width

    def reset(self) -> None:
        self.rows, self.cache, self.width = [], None, 0

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns ``[rows, vocab]``."""
        lengths = torch.tensor([r.length for r in self.rows], device=self.device)
        columns = torch.arange(self.width + 1, device=self.device)
        mask = (columns[None, :] >= (self.width - lengths)[:, None]).long()
        ids = torch.tensor([[r.token] for r in self.rows], device=self.device)
        logits = self._forward(ids, mask, lengths[:, None], self.cache)
        self.width += 1
        for r in self.rows:
            r.length += 1
        return logits


@torch.inference_mode()
def kv_bytes_per_token(model, device: torch.device) -> int:
    """Bytes of KV cache one token takes in this model, measured by a one-token forward."""
    from transformers import DynamicCache

    cache = DynamicCache()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(
        input_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
        use_cache=True,
        **{name: cache},
    )
    size = sum(t.numel() * t.element_size() for x in _layers(cache) for t in (x.keys, x.values))
    return max(1, size)


def auto_kv_tokens(device: torch.device, token_bytes: int) -> int:
    """KV slots that fit in free memory: on a GPU what is free after the weights, less a
    tenth of the card (or 1 GiB) for activations; on a CPU half of what is available."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        spare = free - max(1 << 30, total // 10)
    else:
        spare = available_host_bytes() // 2
    return max(0, spare) // token_bytes


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
