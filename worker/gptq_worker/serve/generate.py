"""Token generation for ``gptq-worker serve``: one engine thread, continuous batching.

It is longer than 400 lines because admission, the engine thread's step and request
lifetimes (cancel, stream, finish) share one lock and are read together.

Requests wait in a bounded queue (a full queue is refused at once with :class:`QueueFull`,
never left to hang). At every step the engine thread admits waiting requests, in arrival
order, while the running batch has fewer than ``max_batch`` rows and the KV cache budget
(``kv_cache_tokens`` slots, by default sized from free memory) still holds every running
request's worst case (:func:`batch.peak_slots`): admitted prompts are prefilled together
and join the running batch, whose rows then decode one token each. Each row samples with
its own settings and seed, stops on its own (end of sequence, a stop string,
``max_tokens``, or the client going away), streams its text as it goes, and leaves the
batch at once, so a short request never waits behind a long one. A request that alone
needs more than the whole budget is refused at submission (:class:`TooLarge`).

One request's failure harms only itself: preparing it or sampling for it fails that row
alone; a failed prefill fails only the requests it was prefilling; a failed step that
decoded rows and prefilled new prompts together fails the new prompts and runs the rows
again alone; a failed decode step fails the rows of that step (their shared cache is
gone) and the engine goes on.

While every row decodes greedily, the static runtime overlaps the host with the GPU: it
launches step N+1 (fed step N's tokens on the device) before it reads, streams and
retires step N's tokens (:meth:`Engine._overlap`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptq_worker.serve.batch import (
    Row,
    RunningBatch,
    auto_kv_tokens,
    kv_bytes_per_token,
    peak_slots,
)
from gptq_worker.serve.metrics import RequestTimes
from gptq_worker.serve.static import StaticBatch, unsupported
from gptq_worker.serve.text import TextStream, sample

log = logging.getLogger(__name__)
MAX_PREFILL_TOKENS = 8192  # prompt tokens prefilled in one step (at least one request)


class QueueFull(RuntimeError):
    pass


class Draining(RuntimeError):
    pass


class TooLarge(ValueError):
    """The request alone needs more KV-cache slots than the engine has."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: decode all max_tokens


@dataclass
class Chunk:
    """What one decode step gave a request: new text and, at the end, why it stopped."""

    text: str
    tokens: int  # generated so far
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    token: int | None = None  # the token sampled (the engine's own bookkeeping)


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Chunk], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)  # for the latency metrics
    times: RequestTimes = field(init=False)
    finished: bool = field(default=False, init=False)  # its last chunk was emitted

    def __post_init__(self) -> None:
        self.times = RequestTimes(self.arrived)


class NoMetrics:
    """What the engine reports to when no server is attached (tests, benches)."""

    def prefilled(self, prompt_tokens: int) -> None:
        pass

    def step(self, tokens: int) -> None:
        pass

    def token(self, t: RequestTimes, now: float) -> None:
        pass

    def finished(self, t, reason: str, prompt_tokens: int, max_tokens: int | None) -> None:
        pass


class Engine:
    """Owns the model; runs the continuous batch on its own thread."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        max_batch: int = 8,
        max_queue: int = 64,
        kv_cache_tokens: int | None = None,
        max_prefill_tokens: int = MAX_PREFILL_TOKENS,
        runtime: str = "auto",
        overlap: bool | None = None,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.context = context_length(model)
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab = model.get_input_embeddings().num_embeddings
        self.kv_token_bytes = kv_bytes_per_token(model, device)
        if kv_cache_tokens is None:
            found = auto_kv_tokens(device, self.kv_token_bytes)
            kv_cache_tokens = min(found, max_batch * self.context)  # more is never used
            if kv_cache_tokens < self.context:
                log.warning(
                    "free memory holds a KV cache of %d tokens, less than the context (%d)",
                    kv_cache_tokens,
                    self.context,
                )
        self.metrics = NoMetrics()  # the server attaches its ServeMetrics
        self.runtime = choose_runtime(runtime, model, device)
        self.tuned: dict = {}  # the kernel configurations the static runtime chose
        if self.runtime == "static":
            # every row owns a slot of a whole context (or of the budget, if smaller)
            capacity = max(1, min(self.context, kv_cache_tokens))
            rows = max(1, min(max_batch, kv_cache_tokens // capacity))
            kv_cache_tokens = rows * capacity
            self._batch = StaticBatch(model, device, self.pad, rows, capacity)
            self.tuned = self._batch.warm()
        else:
            self._batch = RunningBatch(model, device, self.pad)
        self.kv_cache_tokens = kv_cache_tokens
        # the static runtime launches step N+1 before it reads step N's greedy tokens (see
        # _overlap); GPTQ_SERVE_OVERLAP=0 or overlap=False: every step waits for its tokens
        if overlap is None:
            overlap = os.environ.get("GPTQ_SERVE_OVERLAP", "1") != "0"
        self.overlap = overlap and self.runtime == "static"
        self._pending: tuple[list[Row], object] | None = None  # a launched step's rows
        self._waiting: collections.deque[Request] = collections.deque()
        self._running = 0
        self._slots = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._stepping = False  # the loop is between taking work and its step's end
        self._thread = threading.Thread(target=self._loop, name="gptq-engine", daemon=True)
        self._thread.start()

    # -- queue ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        need = peak_slots([(len(request.prompt_ids), request.sampling.max_tokens)])
        limit = self._batch.limit() if self.runtime == "static" else self.kv_cache_tokens
        if need > limit:
            per = " for one request" if self.runtime == "static" else ""
            raise TooLarge(
                f"the prompt's {len(request.prompt_ids)} tokens and max_tokens "
                f"{request.sampling.max_tokens} need {need} KV-cache slots; this server's KV "
                f"cache holds {limit}{per} (--kv-cache-tokens)"
            )
        with self._cv:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache's slots the running batch holds (padding included)."""
        return self._slots / self.kv_cache_tokens if self.kv_cache_tokens else 0.0

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work and wait until every accepted request has finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._draining = True
            while self._waiting or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits, no row runs and the loop's last step has ended (its
        tensors released). ``running`` drops when a request's last token is handed out,
        inside that step; this waits for the step itself. False on timeout."""
        with self._cv:
            return self._cv.wait_for(
                lambda: not (self._waiting or self._batch.rows or self._stepping), timeout
            )

    def stop(self) -> None:
        """End the engine thread; requests still waiting or running end "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- the loop ---------------------------------------------------------------------
    @torch.inference_mode()  # the whole loop: no step may record an autograd graph
    def _loop(self) -> None:
        batch = self._batch
        while True:
            with self._cv:
                while not self._waiting and not batch.rows and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    left = [*self._waiting, *(r.request for r in batch.rows)]
                    self._waiting.clear()
                    batch.reset()
                    self._pending = None
                    self._running = self._slots = 0
                    self._cv.notify_all()
                    break
                admitted = self._admit(batch)
                self._running = len(batch.rows) + len(admitted)
                self._stepping = True
            try:
                if self._overlaps(batch, admitted):
                    self._overlap(batch, admitted)
                else:
                    self._flush(batch)
                    if admitted and batch.rows and getattr(batch, "mixes", None):
                        self._mixed(batch, admitted)  # the static runtime's fused step
                    else:
                        if admitted:
                            self._start(batch, admitted)
                        if batch.rows:
                            self._decode(batch)
            except Exception as err:  # a bug of ours: fail what runs, keep serving
                log.exception("the engine step failed")
                self._fail([*admitted, *(row.request for row in batch.rows)], err)
                batch.reset()
                self._pending = None
            finally:
                with self._cv:
                    self._running, self._slots = len(batch.rows), batch.slots
                    self._stepping = False
                    self._cv.notify_all()
        for r in left:
            self._emit(r, Chunk("", r.times.tokens, "cancelled"))

    def _admit(self, batch: RunningBatch) -> list[Request]:
        """Waiting requests that may join now, in arrival order (called under the lock)."""
        # a row fed on the device has a step in flight whose token is not counted yet
        shapes = [(r.length - (r.fed is not None), r.growth) for r in batch.rows]
        admitted: list[Request] = []
        prefill = 0
        while self._waiting and len(batch.rows) + len(admitted) < self.max_batch:
            r = self._waiting[0]
            if r.cancelled.is_set():  # its client left while it waited
                self._waiting.popleft()
                self._emit(r, Chunk("", 0, "cancelled"))
                continue
            shape = (len(r.prompt_ids), r.sampling.max_tokens)
            if admitted and prefill + shape[0] > self.max_prefill_tokens:
                break
            if not self._fits([*shapes, shape]):
                break  # first come, first served: later ones do not overtake it
            shapes.append(shape)
            prefill += shape[0]
            admitted.append(self._waiting.popleft())
        return admitted

    def _fits(self, shapes: list[tuple[int, int]]) -> bool:
        if self.runtime == "static":
            return self._batch.fits(shapes)
        return peak_slots(shapes) <= self.kv_cache_tokens

    def _mixed(self, batch: StaticBatch, admitted: list[Request]) -> None:
        """The decoding rows' step and the admitted prompts' prefill in one forward (the
        static runtime's fused step, when the prompts fit its token budget): the running
        requests lose no step to a new one. Otherwise a prefill, then a decode step."""
        rows = self._rows(admitted)
        gone = [row for row in batch.rows if row.request.cancelled.is_set()]
        for row in gone:
            self._emit(row.request, Chunk("", row.count, "cancelled"))
        batch.leave(gone)
        prompts = [row.request.prompt_ids for row in rows]
        if not rows or not batch.rows or not batch.mixes(prompts):
            if rows:
                self._prefill(batch, rows)
            if batch.rows:
                self._decode(batch)
            return
        self.metrics.prefilled(sum(map(len, prompts)))
        self.metrics.step(sum(map(len, prompts)) + len(batch.rows))
        try:
            logits, first, start = batch.mixed(prompts)
        except Exception as err:  # the new prompts fail; the running rows step alone
            log.exception("the combined decode and prefill step failed")
            self._fail([row.request for row in rows], err)
            self._decode(batch)
            return
        self._sample(batch.rows, logits)
        self._sample(rows, first)
        picked = [i for i, row in enumerate(rows) if not row.done]
        batch.join([rows[i] for i in picked], start, picked)
        batch.leave([row for row in batch.rows if row.done])

    # -- the overlapped step (static runtime, greedy rows) -------------------------------
    def _overlaps(self, batch, admitted: list[Request]) -> bool:
        """Whether this step may be launched before the previous one's tokens are read:
        every row and every admitted request decodes greedily (the step's argmax, taken
        on the device, is then the next input; sampling needs the logits on the host)."""
        return (
            self.overlap
            and all(row.request.sampling.temperature == 0 for row in batch.rows)
            and all(r.sampling.temperature == 0 for r in admitted)
        )

    def _overlap(self, batch: StaticBatch, admitted: list[Request]) -> None:
        """Launch step N+1 (the rows' inputs are step N's greedy tokens, still on the
        device; admitted prompts prefill in it when the fused step takes them), then read,
        emit and retire step N's tokens while N+1 runs: the host's work per step hides
        behind the GPU's. A row that finished at step N was in step N+1 too; that token is
        dropped (it leaves before N+2)."""
        rows = self._rows(admitted)
        gone = [row for row in batch.rows if row.request.cancelled.is_set() and not row.done]
        for row in gone:
            row.done = True
            self._emit(row.request, Chunk("", row.count, "cancelled"))
        batch.leave(gone)
        prompts = [row.request.prompt_ids for row in rows]
        if rows and not batch.mixes(prompts, decoding=bool(batch.rows)):
            self._flush(batch)  # prompts the fused step cannot take: the plain prefill
            self._prefill(batch, rows)
            rows, prompts = [], []
        if not batch.rows and not rows:
            self._flush(batch)
            return
        if prompts:
            self.metrics.prefilled(sum(map(len, prompts)))
        self.metrics.step(sum(map(len, prompts)) + len(batch.rows))
        try:
            fetch, start = batch.launch(prompts)
        except Exception as err:
            if not prompts:
                raise
            # the new prompts fail; the running rows step alone, from their host tokens
            log.exception("the combined decode and prefill step failed")
            self._fail([row.request for row in rows], err)
            self._flush(batch)
            if not batch.rows:
                return
            rows = []
            fetch, start = batch.launch([])
        for j, row in enumerate(rows):
            row.fed = start + j
        batch.join(rows, start, list(range(len(rows))))
        previous, self._pending = self._pending, (list(batch.rows), fetch)
        if previous is not None:
            self._finish(batch, previous)

    def _finish(self, batch: StaticBatch, pending) -> None:
        """Read a launched step's tokens (waiting for it), emit them, retire finished rows."""
        rows, fetch = pending
        for row, token in zip(rows, fetch.tokens(), strict=True):
            if not row.done:
                self._take(row, None, token)
        batch.leave([row for row in batch.rows if row.done])
        if not batch.rows:
            self._pending = None  # every row of the step in flight has finished

    def _flush(self, batch) -> None:
        """Finish the launched step, if any: every row's next input is then on the host."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self._finish(batch, pending)
        for row in batch.rows:
            row.fed = None

    def _start(self, batch: RunningBatch, admitted: list[Request]) -> None:
        """Prefill the admitted requests, sample their first tokens, join the batch."""
        rows = self._rows(admitted)
        if rows:
            self._prefill(batch, rows)

    def _rows(self, admitted: list[Request]) -> list[Row]:
        """The admitted requests' rows; one that cannot be prepared fails alone."""
        now = time.monotonic()
        rows: list[Row] = []
        for r in admitted:
            r.times.scheduled = now
            # each request is prepared on its own: one that cannot be (a seed torch refuses,
            # a token id outside the vocabulary) fails alone, and the others run
            try:
                generator, stream = self._prepare(r)
            except Exception as err:
                log.warning("request refused by the engine: %s: %s", type(err).__name__, err)
                self._fail([r], err)
                continue
            rows.append(Row(r, generator, stream, length=len(r.prompt_ids)))
        return rows

    def _prefill(self, batch: RunningBatch, rows: list[Row]) -> None:
        prompts = [row.request.prompt_ids for row in rows]
        self.metrics.prefilled(sum(map(len, prompts)))
        self.metrics.step(sum(map(len, prompts)))
        try:
            logits, cache = batch.prefill(prompts)
        except Exception as err:  # e.g. out of memory: these requests fail, the batch runs on
            log.exception("prefill failed")
            self._fail([row.request for row in rows], err)
            return
        self._sample(rows, logits)
        picked = [i for i, row in enumerate(rows) if not row.done]
        batch.join([rows[i] for i in picked], cache, picked)

    def _decode(self, batch: RunningBatch) -> None:
        gone = [row for row in batch.rows if row.request.cancelled.is_set()]
        for row in gone:
            self._emit(row.request, Chunk("", row.count, "cancelled"))
        batch.leave(gone)
        if not batch.rows:
            return
        self.metrics.step(len(batch.rows))
        logits = batch.decode()
        self._sample(batch.rows, logits)
        batch.leave([row for row in batch.rows if row.done])

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """One token for each row from its logits; emits, and marks finished rows done."""
        greedy = None
        if any(row.request.sampling.temperature == 0 for row in rows):
            greedy = logits.argmax(-1).tolist()  # one transfer for all greedy rows
        for i, row in enumerate(rows):
            token = greedy[i] if row.request.sampling.temperature == 0 else None
            self._take(row, logits[i], token)

    def _take(self, row: Row, logits: torch.Tensor | None, token: int | None) -> None:
        """Sample (or take ``token``), emit, and mark the row done if it finished."""
        r = row.request
        if r.cancelled.is_set():
            row.done = True
            self._emit(r, Chunk("", row.count, "cancelled"))
            return
        try:
            chunk = self._step(row, logits, token)
        except Exception as err:  # this row's sampling or decoding: it alone fails
            log.warning("request failed while decoding: %s: %s", type(err).__name__, err)
            row.done = True
            self._emit(r, Chunk("", row.count, "error", error=f"{type(err).__name__}: {err}"))
            return
        row.count, row.token = chunk.tokens, chunk.token
        row.done = chunk.finish_reason is not None
        self._emit(r, chunk)

    def _fail(self, requests: list[Request], err: Exception) -> None:
        for r in requests:
            if not r.finished:
                self._emit(
                    r, Chunk("", r.times.tokens, "error", error=f"{type(err).__name__}: {err}")
                )

    def _emit(self, r: Request, chunk: Chunk) -> None:
        """Record the chunk in the metrics, then hand it to its request."""
        t = r.times
        if chunk.token is not None:
            now = time.monotonic()
            self.metrics.token(t, now)
            t.first_token = t.first_token or now
            t.last_token, t.tokens = now, t.tokens + 1
        if chunk.finish_reason is not None:
            r.finished = True
            s = r.sampling
            self.metrics.finished(t, chunk.finish_reason, len(r.prompt_ids), s.max_tokens)
            if t.scheduled:  # it ran: it leaves `running` before its client has the answer
                with self._cv:
                    self._running = max(0, self._running - 1)
        _emit(r, chunk)

    def _prepare(self, r: Request) -> tuple[torch.Generator | None, TextStream]:
        if not r.prompt_ids or r.sampling.max_tokens < 1:
            raise ValueError("empty prompt or max_tokens < 1")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab for t in r.prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab})")
        g = None
        if r.sampling.temperature > 0:
            g = torch.Generator(device=self.device)
            g.manual_seed(r.sampling.seed if r.sampling.seed is not None else g.seed())
        return g, TextStream(self.tokenizer, r.sampling.stop)

    def _step(self, row: Row, logits: torch.Tensor, token: int | None) -> Chunk:
        """Sample one token for ``row`` (``token`` if already chosen greedily)."""
        r, stream, count = row.request, row.stream, row.count + 1
        if token is None:
            token = sample(logits, r.sampling, row.generator)
        if token in self.eos and not r.sampling.ignore_eos:
            chunk = Chunk(stream.flush(), count, "stop")
        else:
            delta, stopped = stream.push(token)
            if stopped:
                chunk = Chunk(delta, count, "stop")
            elif count >= r.sampling.max_tokens:
                chunk = Chunk(delta + stream.flush(), count, "length")
            else:
                chunk = Chunk(delta, count, None)
        chunk.token = token
        return chunk


def _emit(r: Request, chunk: Chunk) -> None:
    """Hand a chunk to its request; a receiver that is gone (its loop closed) is not the
    batch's problem."""
    try:
        r.emit(chunk)
    except Exception:
        r.cancelled.set()
        log.debug("could not deliver a chunk", exc_info=True)


def choose_runtime(runtime: str, model, device: torch.device) -> str:
    """``static`` (StaticBatch: static KV cache, fused kernels, CUDA graphs on a GPU) or
    ``dynamic`` (RunningBatch: any transformers causal LM). ``auto`` takes static on a
    GPU when the model is supported, dynamic otherwise."""
    if runtime not in ("auto", "static", "dynamic"):
        raise ValueError(f"runtime must be auto, static or dynamic, not {runtime!r}")
    reason = unsupported(model)
    if runtime == "static" and reason:
        raise ValueError(f"the static runtime cannot run this model: {reason}")
    if runtime == "auto":
        runtime = "static" if device.type == "cuda" and reason is None else "dynamic"
        if device.type == "cuda" and reason:
            log.info("dynamic runtime: %s", reason)
    return runtime


def context_length(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_ids(model, tokenizer) -> set[int]:
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found
