"""The Prometheus metrics of ``gptq-worker serve``, in a registry of their own.

Serving metrics carry vLLM's names, types and labels where the meaning matches, so that
dashboards, alerts and autoscaler rules written for vLLM work on the built-in runtime too.
They were read from vLLM 0.32.0's ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``):
the label names ``["model_name", "engine"]`` (line 499), ``vllm:num_requests_running``
(528), ``vllm:num_requests_waiting`` (538), ``vllm:kv_cache_usage_perc`` (620, a fraction:
1 means full), ``vllm:prompt_tokens`` (748), ``vllm:generation_tokens`` (799),
``vllm:request_success`` with ``finished_reason`` (809; reasons ``stop``, ``length``,
``abort``, ``error`` from ``vllm/v1/engine/__init__.py:36``), ``vllm:admission_rejections``
with ``model_name`` and ``reason`` only (848; ``max_num_queued_reqs`` from line 47),
``vllm:request_prompt_tokens`` (865), ``vllm:request_generation_tokens`` (875),
``vllm:iteration_tokens_total`` (888), ``vllm:request_params_max_tokens`` (918),
``vllm:time_to_first_token_seconds`` (931), ``vllm:inter_token_latency_seconds`` (941),
``vllm:request_time_per_output_token_seconds`` (951), ``vllm:e2e_request_latency_seconds``
(961), ``vllm:request_queue_time_seconds`` (971), ``vllm:request_inference_time_seconds``
(981), ``vllm:request_prefill_time_seconds`` (991), ``vllm:request_decode_time_seconds``
(1001). What each interval spans follows ``vllm/v1/metrics/stats.py:590-612``
(``update_from_finished_request``). ``tests/worker/test_serve_metrics.py`` checks these
names, types and labels against the installed vLLM source.

Metrics with no vLLM counterpart keep our prefix: HTTP requests by endpoint and status
(``gptq_serve_requests_total``, ``gptq_serve_request_duration_seconds``, errors included)
and what was loaded (``gptq_serve_model_weight_bytes``, ``gptq_serve_model_info``), and
the accelerator's memory as torch's allocator holds it
(``gptq_serve_device_memory_bytes{kind=allocated|reserved}``, read at each scrape; on a GPU
only). The process's own (``process_resident_memory_bytes``, CPU seconds, open files) come
from prometheus_client's ``ProcessCollector``, as on vLLM's default registry. Memory that
grows while the load does not is what these are for: a leak shows as a rising line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

HTTP_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# seconds: interactive first tokens up to minutes behind a queue
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
STEP_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0)
REQUEST_BUCKETS += (50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
ENGINE = "0"  # one engine per process, as vLLM's label for a single engine core


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit``: token-count buckets."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


@dataclass
class RequestTimes:
    """One request's life in the engine, as monotonic times (``0.0``: not reached)."""

    arrived: float
    scheduled: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    tokens: int = 0


class ServeMetrics:
    def __init__(self, model_name: str = "", max_model_len: int = 1 << 20) -> None:
        self.registry = r = CollectorRegistry()
        labels, values = ["model_name", "engine"], (model_name, ENGINE)
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(*values)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        # -- HTTP, and what is loaded (ours) --------------------------------------------
        self.requests = Counter(
            "gptq_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gptq_serve_request_duration_seconds",
            "Time from receiving an HTTP request to its last byte, errors included",
            ["endpoint"],
            buckets=HTTP_LATENCY_BUCKETS,
            registry=r,
        )
        self.weight_bytes = Gauge(
            "gptq_serve_model_weight_bytes",
            "Bytes of the quantized layers' weights: as held (packed) and as fp16 would be",
            ["form"],
            registry=r,
        )
        self.info = Info("gptq_serve_model", "The model being served", registry=r)
        self.device_memory = Gauge(
            "gptq_serve_device_memory_bytes",
            "Accelerator memory held by torch's allocator: in live tensors (allocated) and "
            "cached (reserved)",
            ["kind"],
            registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the rest

        # -- the engine, under vLLM's names --------------------------------------------
        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Requests waiting for a place in the running batch."
        )
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage of its token budget. 1 means full."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        success = Counter(
            "vllm:request_success",
            "Requests finished, by why they finished.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.success = {
            ours: success.labels(*values, theirs) for ours, theirs in FINISH_REASONS.items()
        }
        self.rejections = Counter(
            "vllm:admission_rejections",
            "Requests refused because the waiting queue was full (429), by reason.",
            ["model_name", "reason"],
            registry=r,
        ).labels(model_name, "max_num_queued_reqs")
        tokens = one_two_five(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per finished request.", tokens
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per finished request.", tokens
        )
        self.request_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens of finished requests.", tokens
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Tokens per engine step.", ITERATION_BUCKETS
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Time between consecutive tokens.", STEP_BUCKETS
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per finished request: decode time / (generated tokens - 1).",
            STEP_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time waiting for the batch.", REQUEST_BUCKETS
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Time in the running batch (scheduled to last token).",
            REQUEST_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Time from scheduled to the first token.",
            REQUEST_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Time from the first token to the last.",
            REQUEST_BUCKETS,
        )

    def watch_device(self, device) -> bool:
        """Report ``device``'s allocator memory at each scrape; False where there is none
        to report (a CPU: the process's resident memory covers it)."""
        import torch

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        self.device_memory.labels("allocated").set_function(
            lambda: torch.cuda.memory_allocated(device)
        )
        self.device_memory.labels("reserved").set_function(
            lambda: torch.cuda.memory_reserved(device)
        )
        return True

    # -- called from the engine thread (prometheus_client is thread-safe) ------------------
    def prefilled(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def step(self, tokens: int) -> None:
        self.iteration_tokens.observe(tokens)

    def token(self, t: RequestTimes, now: float) -> None:
        """A request got a token at ``now`` (``t`` is updated by the caller afterwards)."""
        self.generation_tokens.inc()
        if t.tokens == 0:
            self.ttft.observe(now - t.arrived)
        else:
            self.itl.observe(now - t.last_token)

    def finished(
        self, t: RequestTimes, reason: str, prompt_tokens: int, max_tokens: int | None
    ) -> None:
        now = time.monotonic()
        self.success[reason].inc()
        self.e2e.observe(now - t.arrived)
        scheduled = t.scheduled or now
        self.queue_time.observe(scheduled - t.arrived)
        first, last = t.first_token or scheduled, t.last_token or scheduled
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(last - first)
        self.inference_time.observe(last - scheduled)
        self.tpot.observe((last - first) / (t.tokens - 1) if t.tokens > 1 else 0.0)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(t.tokens)
        if max_tokens:
            self.request_max_tokens.observe(max_tokens)
