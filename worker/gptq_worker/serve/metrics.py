"""The Prometheus metrics of ``gptq-worker serve``, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gptq_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gptq_serve_request_duration_seconds",
            "Time from receiving a request to its last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gptq_serve_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gptq_serve_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.generated_tokens = Counter(
            "gptq_serve_generation_tokens", "Tokens generated", registry=r
        )
        self.running = Gauge(
            "gptq_serve_requests_running", "Requests being generated now", registry=r
        )
        self.waiting = Gauge(
            "gptq_serve_requests_waiting", "Requests queued for the next batch", registry=r
        )
        self.weight_bytes = Gauge(
            "gptq_serve_model_weight_bytes",
            "Bytes of the quantized layers' weights: as held (packed) and as fp16 would be",
            ["form"],
            registry=r,
        )
        self.info = Info("gptq_serve_model", "The model being served", registry=r)
