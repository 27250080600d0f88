"""Token generation for ``gptq-worker serve``: one engine thread, requests in batches.

Requests wait in a bounded queue. The engine thread takes up to ``max_batch`` of them,
left-pads their prompts into one batch and decodes it step by step with one KV cache;
each row samples with its own settings and seed, stops on its own (end of sequence, a
stop string, ``max_tokens``, or the client going away) and streams its text as it goes.
Requests that arrive meanwhile wait for the next batch. A full queue is refused at once
(:class:`QueueFull`), never left to hang.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptq_worker.serve.metrics import RequestTimes
from gptq_worker.serve.text import TextStream, sample

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class Draining(RuntimeError):
    pass


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
    """Owns the model; runs batches on its own thread."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        max_batch: int = 8,
        max_queue: int = 64,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = context_length(model)
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: collections.deque[Request] = collections.deque()
        self._running = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self.metrics = NoMetrics()  # the server attaches its ServeMetrics
        self._thread = threading.Thread(target=self._loop, name="gptq-engine", daemon=True)
        self._thread.start()

    # -- queue ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
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
        """Fraction of the KV cache's token budget in use (no budget yet: 0)."""
        return 0.0

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

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._waiting:
                    return
                batch = []
                while self._waiting and len(batch) < self.max_batch:
                    r = self._waiting.popleft()
                    if r.cancelled.is_set():  # its client left while it waited
                        self._emit(r, Chunk("", 0, "cancelled"))
                    else:
                        batch.append(r)
                self._running = len(batch)
            try:
                if batch:
                    self.generate(batch)
            except Exception as err:  # one bad batch must not kill the server
                log.exception("generation failed")
                for r in batch:
                    self._emit(r, Chunk("", 0, "error", error=f"{type(err).__name__}: {err}"))
            finally:
                with self._cv:
                    self._running = 0
                    self._cv.notify_all()

    # -- decoding ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, batch: list[Request]) -> None:
        from transformers import DynamicCache

        # each request is prepared on its own: one that cannot be (a seed torch refuses, a
        # token id outside the vocabulary) fails alone, and the others run
        prepared = []
        for r in batch:
            try:
                prepared.append((r, *self._prepare(r)))
            except Exception as err:
                log.warning("request refused by the engine: %s: %s", type(err).__name__, err)
                self._emit(r, Chunk("", 0, "error", error=f"{type(err).__name__}: {err}"))
        if not prepared:
            return
        batch = [p[0] for p in prepared]
        now = time.monotonic()
        for r in batch:
            r.times.scheduled = now
        self.metrics.prefilled(sum(len(r.prompt_ids) for r in batch))
        generators = [p[1] for p in prepared]
        streams = [p[2] for p in prepared]
        n = len(batch)
        longest = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((n, longest), self.pad, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's last token is at -1
            ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        done = [False] * n
        counts = [0] * n
        cache = DynamicCache()
        step_ids, step_pos = ids, positions
        while not all(done):
            self.metrics.step(int(mask[:, -step_ids.shape[1] :].sum()))
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            cache = out.past_key_values
            next_ids = torch.full((n,), self.pad, dtype=torch.long)
            for i, r in enumerate(batch):
                if done[i]:
                    continue
                if r.cancelled.is_set():
                    done[i] = True
                    self._emit(r, Chunk("", counts[i], "cancelled"))
                    continue
                try:
                    chunk = self._step(r, logits[i], generators[i], streams[i], counts[i] + 1)
                except Exception as err:  # this row's sampling or decoding: it alone fails
                    log.warning("request failed while decoding: %s: %s", type(err).__name__, err)
                    chunk = Chunk("", counts[i], "error", error=f"{type(err).__name__}: {err}")
                    done[i] = True
                    self._emit(r, chunk)
                    continue
                counts[i] = chunk.tokens
                next_ids[i] = chunk.token
                done[i] = chunk.finish_reason is not None
                self._emit(r, chunk)
            step_ids = next_ids.view(n, 1).to(self.device)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], 1)
            step_pos = step_pos[:, -1:] + 1

    def _emit(self, r: Request, chunk: Chunk) -> None:
        """Record the chunk in the metrics, then hand it to its request."""
        t = r.times
        if chunk.token is not None:
            now = time.monotonic()
            self.metrics.token(t, now)
            t.first_token = t.first_token or now
            t.last_token, t.tokens = now, t.tokens + 1
        if chunk.finish_reason is not None:
            s = r.sampling
            self.metrics.finished(t, chunk.finish_reason, len(r.prompt_ids), s.max_tokens)
        _emit(r, chunk)

    def _prepare(self, r: Request) -> tuple[torch.Generator | None, TextStream]:
        if not r.prompt_ids or r.sampling.max_tokens < 1:
            raise ValueError("empty prompt or max_tokens < 1")
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in r.prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        g = None
        if r.sampling.temperature > 0:
            g = torch.Generator(device=self.device)
            g.manual_seed(r.sampling.seed if r.sampling.seed is not None else g.seed())
        return g, TextStream(self.tokenizer, r.sampling.stop)

    def _step(self, r: Request, logits, generator, stream: TextStream, count: int) -> Chunk:
        """Sample one token for ``r``: the chunk to send, its token in ``chunk.token``."""
        token = sample(logits, r.sampling, generator)
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
