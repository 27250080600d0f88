"""``gptq-worker serve`` as a real process: the OpenAI-compatible API, metrics, limits, shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from gptq_worker.serve.generate import eos_ids
from gptq_worker.serve.model import load_quantized_model

from .conftest import NAME, PROMPT, Served
from .test_serve import dense_copy, greedy

ENGINE = {"engine": "0", "model_name": NAME}  # the labels of every vllm: metric


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint) -> Path:
    return served_checkpoint


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy text from the dequantized dense model, and its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dense = dense_copy(load_quantized_model(checkpoint))
    eos = eos_ids(dense, tokenizer)

    def text(prompt_ids: list[int], steps: int) -> tuple[str, list[int]]:
        ids = greedy(dense, prompt_ids, steps, eos)
        return tokenizer.decode(ids, skip_special_tokens=True), ids

    return tokenizer, text


def test_probes_and_model_list(server):
    assert server.get("/healthz")[0] == 200
    status, body = server.get("/readyz")
    assert status == 200 and json.loads(body)["model"] == NAME
    status, body = server.get("/v1/models")
    card = json.loads(body)["data"][0]
    assert card["id"] == NAME
    assert card["max_model_len"] == 1024
    assert card["quantization"] == {
        "bits": "4",
        "group_size": "32",
        "desc_act": "false",
        "kernel": "builtin/torch",
    }


def test_greedy_completion_equals_the_dequantized_model(server, reference):
    tokenizer, text = reference
    expected, ids = text(tokenizer(PROMPT).input_ids, 20)
    status, body = server.post(
        "/v1/completions",
        {"model": NAME, "prompt": PROMPT, "max_tokens": 20, "temperature": 0},
    )
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == expected
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["usage"] == {
        "prompt_tokens": len(tokenizer(PROMPT).input_ids),
        "completion_tokens": len(ids),
        "total_tokens": len(tokenizer(PROMPT).input_ids) + len(ids),
    }


def test_token_id_prompt_gives_the_same_text(server, reference):
    tokenizer, _ = reference
    ids = tokenizer(PROMPT).input_ids
    by_text = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    by_ids = server.post("/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert by_text[1]["choices"][0]["text"] == by_ids[1]["choices"][0]["text"]


def test_streamed_completion_adds_up_to_the_whole(server):
    payload = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    whole = server.post("/v1/completions", payload)[1]["choices"][0]
    events = server.stream(
        "/v1/completions", {**payload, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    chunks = events[:-2]
    assert "".join(e["choices"][0]["text"] for e in chunks) == whole["text"]
    assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == whole["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])


def test_chat_completion_uses_the_chat_template(server, reference):
    tokenizer, text = reference
    messages = [{"role": "user", "content": "write a function that adds two numbers"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    expected, _ = text(list(ids), 12)
    status, body = server.post(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0}
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    events = server.stream(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0}
    )
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
    assert events[-2]["object"] == "chat.completion.chunk"


def test_stop_string_ends_the_text_before_it(server):
    payload = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    full = server.post("/v1/completions", payload)[1]["choices"][0]["text"]
    assert len(full) > 6
    stop = full[4:7]
    cut = full[: full.index(stop)]
    status, body = server.post("/v1/completions", {**payload, "stop": [stop]})
    assert status == 200
    assert body["choices"][0] == {
        "index": 0,
        "text": cut,
        "logprobs": None,
        "finish_reason": "stop",
    }
    streamed = server.stream("/v1/completions", {**payload, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut


def test_ignore_eos_decodes_every_requested_token(server):
    payload = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    status, body = server.post("/v1/completions", payload)
    assert status == 200
    assert body["usage"]["completion_tokens"] == 40
    assert body["choices"][0]["finish_reason"] == "length"


def test_seed_makes_sampling_repeatable(server):
    payload = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "top_p": 0.95}
    a = server.post("/v1/completions", {**payload, "seed": 7})[1]["choices"][0]["text"]
    b = server.post("/v1/completions", {**payload, "seed": 7})[1]["choices"][0]["text"]
    c = server.post("/v1/completions", {**payload, "seed": 8})[1]["choices"][0]["text"]
    assert a == b != c


@pytest.mark.parametrize(
    ("payload", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 5000}, 400, "ask for at most"),
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop"),
        ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
        ({"prompt": [1, 10**9]}, 400, "token ids must lie in"),
        ({"max_tokens": 3}, 400, "prompt"),
    ],
)
def test_bad_completion_requests_are_named(server, payload, status, says):
    got, body = server.post("/v1/completions", payload)
    assert got == status, body
    assert says in body["error"]["message"]
    assert body["error"]["type"] in ("invalid_request_error", "not_found_error")


def test_unknown_model_error_has_openai_shape(server):
    status, body = server.post(
        "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


def test_oversized_prompt_is_refused(server, reference):
    tokenizer, _ = reference
    words = " ".join(f"name_{i}" for i in range(2000))
    assert len(tokenizer(words).input_ids) > 1024
    status, body = server.post("/v1/completions", {"prompt": words, "max_tokens": 1})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert "context is 1024 tokens" in body["error"]["message"]
    status, body = server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": words}]}
    )
    assert status == 400 and body["error"]["param"] == "messages"


def test_chat_rejects_empty_and_non_text_messages(server):
    status, body = server.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and "messages" in body["error"]["message"]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    status, body = server.post("/v1/chat/completions", {"messages": [image]})
    assert status == 400 and "only text is served" in body["error"]["message"]


def test_unknown_path_and_method(server):
    status, data = server.get("/v1/embeddings")
    assert status == 404 and "error" in json.loads(data)
    status, data = server.get("/v1/completions")
    assert status == 405


def test_metrics_count_requests_and_tokens(server, reference):
    tokenizer, _ = reference
    before = server.metrics()
    key = ("gptq_serve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    bad = ("gptq_serve_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    answers = []
    for _ in range(3):
        status, body = server.post(
            "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        )
        assert status == 200
        answers.append(body)
    assert server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 0})[0] == 400
    after = server.metrics()

    def delta(name: str, **labels) -> float:
        k = (name, tuple(sorted((ENGINE | labels).items())))
        return after[k] - before.get(k, 0)

    assert after[key] - before.get(key, 0) == 3
    assert after[bad] - before.get(bad, 0) == 1
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    assert delta("vllm:generation_tokens_total") == generated
    assert delta("vllm:request_generation_tokens_sum") == generated
    assert delta("vllm:prompt_tokens_total") == 3 * len(tokenizer(PROMPT).input_ids)
    assert delta("vllm:time_to_first_token_seconds_count") == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:inter_token_latency_seconds_count") == generated - 3
    reasons = [a["choices"][0]["finish_reason"] for a in answers]
    for reason in ("stop", "length"):
        counted = delta("vllm:request_success_total", finished_reason=reason)
        assert counted == reasons.count(reason)
    latency = ("gptq_serve_request_duration_seconds_count", (("endpoint", "/v1/completions"),))
    assert after[latency] - before.get(latency, 0) == 4
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert after[(gauge, tuple(sorted(ENGINE.items())))] == 0
    info = next(labels for (name, labels) in after if name == "gptq_serve_model_info")
    assert dict(info) | {"device": "cpu"} == dict(info)
    assert dict(info)["bits"] == "4" and dict(info)["kernel"] == "builtin/torch"
    packed = after[("gptq_serve_model_weight_bytes", (("form", "packed"),))]
    fp16 = after[("gptq_serve_model_weight_bytes", (("form", "fp16"),))]
    assert 0.25 < packed / fp16 < 0.35
    # the process's memory (a leak shows as a rising line); no device series on a CPU
    assert after[("process_resident_memory_bytes", ())] > 100 * 2**20
    assert not any(name == "gptq_serve_device_memory_bytes" for name, _ in after)


def _stream_in_background(server: Served, payload: dict):
    """Start a streamed completion; returns (thread, first-event flag, collected events)."""
    events: list = []
    started = threading.Event()

    def go():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({**payload, "stream": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        events.append(resp.status)
        buffer = b""
        while chunk := resp.read1(65536):
            buffer += chunk
            if b"data: " in buffer:
                started.set()
        events.extend(p[6:].decode() for p in buffer.split(b"\n\n") if p.startswith(b"data: "))
        started.set()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, started, events


def test_full_queue_answers_429_at_once(checkpoint):
    s = Served(checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        s.wait_ready()
        long = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        running, started, _ = _stream_in_background(s, long)
        assert started.wait(60)
        queued, _, queued_events = _stream_in_background(s, {**long, "max_tokens": 2})
        deadline = time.monotonic() + 30
        waiting = ("vllm:num_requests_waiting", tuple(sorted(ENGINE.items())))
        while s.metrics()[waiting] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        status, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        rejected = (
            "vllm:admission_rejections_total",
            (("model_name", NAME), ("reason", "max_num_queued_reqs")),
        )
        assert s.metrics()[rejected] == 1
        assert time.monotonic() - t0 < 5
        running.join(120)
        queued.join(120)
        assert queued_events[0] == 200 and queued_events[-1] == "[DONE]"
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_accepted_requests_then_exits(checkpoint):
    s = Served(checkpoint, "--max-batch", "1")
    s.wait_ready()
    payload = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    thread, started, events = _stream_in_background(s, payload)
    assert started.wait(60)
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while s.get("/readyz")[0] != 503:  # draining: not ready, and new work is refused
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "shutting down" in body["error"]["message"]
    thread.join(120)
    assert s.proc.wait(60) == 0
    assert events[0] == 200 and events[-1] == "[DONE]"
    final = json.loads(events[-2])["choices"][0]
    assert final["finish_reason"] in ("length", "stop")
    assert "stopped" in "".join(s.lines)


def test_checkpoint_that_is_not_gptq_exits_2(model_dir):
    s = Served(model_dir("llama"))
    assert s.proc.wait(120) == 2
    s._reader.join(5)
    assert "no quantize_config.json or quantization_config" in "".join(s.lines)
