"""Continuous batching: requests join and leave the running batch at any step, a KV-cache
budget admits them, and what each request gets does not depend on who it ran with."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from gptq_worker.serve.batch import peak_slots
from gptq_worker.serve.generate import Chunk, Engine, Request, Sampling, TooLarge
from gptq_worker.serve.model import load_quantized_model

from .test_serve import dense_copy, greedy

PROMPTS = [
    "import os\nimport sys\n\ndef main(argv):\n    ",
    "class",
    "    for key, value in sorted(items.items()):\n",
    "def parse(self, text):\n    return",
    "# Copyright",
]


class Collected:
    """One request's chunks, as the engine emits them."""

    def __init__(self, prompt: list[int], sampling: Sampling) -> None:
        self.chunks: list[Chunk] = []
        self.first = threading.Event()
        self.done = threading.Event()
        self.done_at = 0.0
        self.request = Request(prompt, sampling, self._emit)

    def _emit(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.first.set()
        if chunk.finish_reason is not None:
            self.done_at = time.monotonic()
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [c.token for c in self.chunks if c.token is not None]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


@pytest.fixture(scope="module")
def served(served_checkpoint):
    return load_quantized_model(served_checkpoint)


@pytest.fixture(scope="module")
def dense(served_checkpoint):
    return dense_copy(load_quantized_model(served_checkpoint))


@pytest.fixture(scope="module")
def tok(served_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_checkpoint)


def test_requests_that_join_a_running_batch_get_their_solo_greedy_tokens(served, dense, tok):
    """Staggered arrivals (each joins while the others decode, with other lengths and
    max_tokens) give the tokens of plain greedy decoding of the dequantized model alone."""
    engine = Engine(served, tok, torch.device("cpu"), max_batch=8)
    eos = engine.eos
    jobs = []
    try:
        for i, text in enumerate(PROMPTS):
            sampling = Sampling(max_tokens=12 + 5 * i, temperature=0, ignore_eos=i % 2 == 0)
            job = Collected(tok(text).input_ids, sampling)
            engine.submit(job.request)
            jobs.append(job)
            assert job.first.wait(60)  # the next one arrives while this one decodes
        for job in jobs:
            assert job.done.wait(120)
    finally:
        engine.stop()
    for job in jobs:
        s = job.request.sampling
        expected = greedy(
            dense, job.request.prompt_ids, s.max_tokens, set() if s.ignore_eos else eos
        )
        assert job.tokens == expected, tok.decode(job.request.prompt_ids)
        assert job.text == tok.decode(expected, skip_special_tokens=True)
        assert job.chunks[-1].finish_reason in ("stop", "length")
    # they really ran together: each later one was scheduled before the first one ended
    first = jobs[0].request.times
    assert all(j.request.times.scheduled < first.last_token for j in jobs[1:])


def test_batched_equals_solo_through_the_engine(served, tok):
    """The same prompts, all at once in one batch and one at a time: the same tokens."""
    sampling = Sampling(max_tokens=20, temperature=0)
    prompts = [tok(t).input_ids for t in PROMPTS]

    def run(together: bool) -> list[list[int]]:
        engine = Engine(served, tok, torch.device("cpu"), max_batch=8 if together else 1)
        try:
            jobs = [Collected(p, sampling) for p in prompts]
            with engine._cv:  # all are waiting when the engine takes its next step
                for job in jobs:
                    engine.submit(job.request)
            for job in jobs:
                assert job.done.wait(120)
        finally:
            engine.stop()
        return [job.tokens for job in jobs]

    assert run(True) == run(False)


def test_a_short_request_finishes_before_a_long_one_started_earlier(served, tok):
    engine = Engine(served, tok, torch.device("cpu"), max_batch=4)
    prompt = tok(PROMPTS[0]).input_ids
    try:
        long = Collected(prompt, Sampling(max_tokens=600, temperature=0, ignore_eos=True))
        engine.submit(long.request)
        assert long.first.wait(60)
        short = Collected(prompt, Sampling(max_tokens=2, temperature=0, ignore_eos=True))
        engine.submit(short.request)
        assert short.done.wait(60)
        assert not long.done.is_set()  # it is still decoding: the short one did not wait
        assert long.done.wait(300)
    finally:
        engine.stop()
    assert short.done_at < long.done_at
    assert len(short.tokens) == 2 and len(long.tokens) == 600
    assert short.tokens == long.tokens[:2]  # same prompt, greedy: the same first tokens


def test_kv_budget_makes_requests_wait_then_admits_them(served, tok):
    prompt = tok(PROMPTS[1]).input_ids
    sampling = Sampling(max_tokens=40, temperature=0, ignore_eos=True)
    need = len(prompt) + sampling.max_tokens
    engine = Engine(served, tok, torch.device("cpu"), max_batch=8, kv_cache_tokens=need + 5)
    try:
        first, second = Collected(prompt, sampling), Collected(prompt, sampling)
        with engine._cv:
            engine.submit(first.request)
            engine.submit(second.request)
        assert first.first.wait(60)
        assert engine.waiting == 1 and engine.running == 1  # the budget holds one of them
        deadline = time.monotonic() + 30
        while engine.kv_usage == 0:  # set once the step that admitted it is over
            assert time.monotonic() < deadline and not first.done.is_set()
            time.sleep(0.001)
        assert 0 < engine.kv_usage <= 1
        assert second.done.wait(120) and first.done.is_set()
        assert second.request.times.scheduled >= first.request.times.last_token
        assert second.tokens == first.tokens
        with pytest.raises(TooLarge, match="KV-cache slots"):
            engine.submit(Request(prompt, Sampling(max_tokens=need + 5), lambda c: None))
    finally:
        engine.stop()
    assert engine.waiting == 0 and engine.running == 0


def test_stop_ends_waiting_and_running_requests_as_cancelled(served, tok):
    engine = Engine(served, tok, torch.device("cpu"), max_batch=1)
    prompt = tok(PROMPTS[2]).input_ids
    long = Sampling(max_tokens=900, temperature=0, ignore_eos=True)
    running, queued = Collected(prompt, long), Collected(prompt, long)
    engine.submit(running.request)
    engine.submit(queued.request)
    assert running.first.wait(60)
    engine.stop()
    assert running.done.wait(5) and queued.done.wait(5)
    assert running.chunks[-1].finish_reason == queued.chunks[-1].finish_reason == "cancelled"
    assert queued.tokens == []


def test_cancelled_rows_leave_and_the_rest_go_on(served, dense, tok):
    engine = Engine(served, tok, torch.device("cpu"), max_batch=4)
    prompts = [tok(t).input_ids for t in PROMPTS[:3]]
    sampling = Sampling(max_tokens=30, temperature=0, ignore_eos=True)
    jobs = [Collected(p, sampling) for p in prompts]
    try:
        with engine._cv:
            for job in jobs:
                engine.submit(job.request)
        assert jobs[1].first.wait(60)
        jobs[1].request.cancelled.set()
        for job in jobs:
            assert job.done.wait(120)
    finally:
        engine.stop()
    assert jobs[1].chunks[-1].finish_reason == "cancelled" and len(jobs[1].tokens) < 30
    for job in (jobs[0], jobs[2]):
        assert job.tokens == greedy(dense, job.request.prompt_ids, 30, set())


def _simulated_peak(rows: list[tuple[int, int]]) -> int:
    """Step by step: rows present at step k have growth >= k; all padded to the longest."""
    peak = 0
    for k in range(max(g for _, g in rows) + 1):
        alive = [length + k for length, g in rows if g >= k]
        peak = max(peak, len(alive) * max(alive))
    return peak


def test_peak_slots_equals_a_step_by_step_simulation():
    rng = random.Random(3)
    for _ in range(300):
        rows = [(rng.randint(1, 60), rng.randint(0, 80)) for _ in range(rng.randint(1, 9))]
        assert peak_slots(rows) == _simulated_peak(rows), rows
