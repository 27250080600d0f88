"""Moving decoder layers between host and accelerator, and timing the phases of a layer."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gptq_worker.pipeline.source import StreamedLayers


class Phases:
    """Seconds per phase of one layer (synchronising the GPU at boundaries when profiling)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


class LayerMover:
    """Moves decoder layers between host and GPU on a side stream, off the main thread.

    While layer ``i`` is computed, layer ``i+1`` is copied in and layer ``i-1`` (with its
    packed tensors) is copied out and saved. One helper thread keeps these in order; each
    copy out first waits for an event recorded after the layer's last use on the main
    stream. On a CPU everything happens in line.
    """

    def __init__(self, device: torch.device, source: StreamedLayers | None = None) -> None:
        self.device = device
        self.source = source  # read layers from disk instead of moving them from the CPU
        self.cuda = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gptq-mover") if self.cuda else None
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._pending: list[Future] = []

    def fetch(self, layer: nn.Module, index: int) -> Future | None:
        if not self.cuda:
            self._load(layer, index)
            return None
        return self._submit(self._to_device, layer, index)

    def release(self, layer: nn.Module, index: int, quantized: set[str]) -> None:
        """Take a finished layer off the device: to the CPU, or (streaming) drop the
        weights of ``quantized`` modules, whose packed form is saved."""
        if self.source is None:
            if self.cuda:
                layer._apply(self.to_host)
            else:
                layer.to("cpu")
        else:
            self.source.release(layer, index, quantized)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in ordinary host memory, through a pinned buffer on the mover's stream (call
        from a job of ``retire``): the GPU's copy overlaps the compute stream, which a copy
        straight into pageable memory did not, and the host keeps no page-locked memory
        beyond the allocator's cache of such buffers (a whole model held in memory would
        otherwise end up page-locked)."""
        if t.device.type != "cuda":
            return t
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        out = torch.empty(t.shape, dtype=t.dtype)
        out.copy_(pinned)
        return out

    def synchronize(self) -> None:
        """Wait for the copies queued on the mover's stream (in ``retire``'s jobs: before
        the host reads what ``release`` or a ``to("cpu", non_blocking=True)`` copied out)."""
        if self.cuda:
            self._stream.synchronize()

    def _load(self, layer: nn.Module, index: int) -> None:
        if self.source is None:
            if self.cuda:
                # pageable host memory is copied by the driver through its own staging and,
                # measured on an H200, did not overlap the compute stream: pin first
                layer._apply(lambda t: t.pin_memory().to(self.device, non_blocking=True))
            else:
                layer.to(self.device)
        else:
            self.source.load(layer, index, self.device)

    def ready(self, fetched: Future | None, layer: nn.Module) -> None:
        """Wait for ``fetch`` and hand the layer's tensors to the main stream."""
        if fetched is None:
            return
        fetched.result()
        main = torch.cuda.current_stream(self.device)
        for t in (*layer.parameters(), *layer.buffers()):
            t.data.record_stream(main)  # freed while main-stream kernels may still read it

    def retire(self, job: Callable[[], None]) -> None:
        """Run ``job`` (copy a finished layer out, save it) after the main stream's work."""
        if not self.cuda:
            job()
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._submit(self._after, event, job)

    def drain(self) -> None:
        """Wait for every queued copy and job; re-raise the first failure."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        for err in errors:
            if err is not None:
                raise err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _submit(self, fn, *args) -> Future:
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def _to_device(self, layer: nn.Module, index: int) -> None:
        with torch.cuda.stream(self._stream):
            self._load(layer, index)
        self._stream.synchronize()

    def _after(self, event: torch.cuda.Event, job: Callable[[], None]) -> None:
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(event)
            job()
        self._stream.synchronize()
