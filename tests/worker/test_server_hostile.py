"""One bad request harms only itself: hostile HTTP inputs against a real ``gptq-worker serve``.

Each hostile input gets its exact status and a message that names the problem, in OpenAI's
error shape; the server stays healthy, other clients' requests still succeed, a client that
goes away stops its generation, and an API key guards ``/v1/*`` (not the probes).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptq_worker.serve.generate import Engine, Request, Sampling
from gptq_worker.serve.model import load_quantized_model

from .conftest import NAME, PROMPT, Served

ENGINE = (("engine", "0"), ("model_name", NAME))
GEN = ("vllm:generation_tokens_total", ENGINE)
RUNNING = ("vllm:num_requests_running", ENGINE)
MIB = 1 << 20


def _chat(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"prompt": "x", "max_tokens": 2}

HOSTILE = [
    # sampling parameters
    ("big-seed", C, {**OK, "seed": 2**64}, 400, "seed: Input should be less than or equal to"),
    ("negative-huge-seed", C, {**OK, "seed": -(2**64)}, 400, "seed: Input should be greater"),
    ("string-seed", C, {**OK, "seed": "7"}, 400, "seed: Input should be a valid integer"),
    ("float-seed", C, {**OK, "seed": 1.5}, 400, "seed: Input should be a valid integer"),
    ("NaN-temperature", C, b'{"prompt": "x", "temperature": NaN}', 400, "NaN is not valid JSON"),
    ("inf-top-p", C, b'{"prompt": "x", "top_p": Infinity}', 400, "Infinity is not valid JSON"),
    ("string-temperature", C, {**OK, "temperature": "0.5"}, 400, "temperature: Input should be"),
    ("bool-temperature", C, {**OK, "temperature": True}, 400, "temperature: Input should be"),
    ("negative-temperature", C, {**OK, "temperature": -1}, 400, "temperature: Input should be"),
    ("top-p-above-1", C, {**OK, "top_p": 1.5}, 400, "top_p: Input should be less than"),
    ("negative-max-tokens", C, {**OK, "max_tokens": -1}, 400, "max_tokens: Input should be"),
    ("float-max-tokens", C, {**OK, "max_tokens": 1e30}, 400, "max_tokens: Input should be"),
    ("huge-max-tokens", C, {**OK, "max_tokens": 10**30}, 400, "max_tokens: Input should be"),
    ("bool-max-tokens", C, {**OK, "max_tokens": True}, 400, "max_tokens: Input should be"),
    ("long-stop", C, {**OK, "stop": "s" * 300}, 400, "at most 256 characters"),
    ("empty-stop", C, {**OK, "stop": [""]}, 400, "stop sequences must not be empty"),
    ("int-stop", C, {**OK, "stop": [1]}, 400, "stop.0: Input should be a valid string"),
    ("string-ignore-eos", C, {**OK, "ignore_eos": "yes"}, 400, "ignore_eos: Input should be"),
    ("string-stream", C, {**OK, "stream": "true"}, 400, "stream: Input should be"),
    (
        "bad-include-usage",
        C,
        {**OK, "stream_options": {"include_usage": "yes"}},
        400,
        "include_usage must be true or false",
    ),
    ("logit-bias", C, {**OK, "logit_bias": {"1": 100}}, 400, "logit_bias is not supported"),
    ("presence-penalty", C, {**OK, "presence_penalty": 1}, 400, "presence_penalty: Input"),
    ("tools", CHAT, {**_chat("hi"), "tools": [{"type": "function"}]}, 400, "tools is not"),
    ("int-model", C, {**OK, "model": 5}, 400, "model: Input should be a valid string"),
    # prompts
    ("empty-prompt", C, {"prompt": ""}, 400, "prompt: prompt is empty"),
    ("empty-prompt-list", C, {"prompt": []}, 400, "prompt: prompt is empty"),
    ("bool-token-id", C, {"prompt": [1, True]}, 400, "prompt.1: Input should be a valid integer"),
    ("negative-token-id", C, {"prompt": [-1]}, 400, "prompt token ids must lie in [0, "),
    ("number-prompt", C, {"prompt": 5}, 400, "prompt: Input should be a valid"),
    ("null-prompt", C, {"prompt": None}, 400, "prompt: Input should be a valid"),
    ("lone-surrogate", C, b'{"prompt": "\\ud800"}', 400, "the prompt cannot be tokenized"),
    # bodies
    ("empty-body", C, b"", 400, "request body is empty"),
    ("non-utf8", C, b'{"prompt": "\xff\xfe"}', 400, "request body is not valid UTF-8"),
    ("json-string", C, b'"hi"', 400, "request body must be a JSON object"),
    ("json-null", C, b"null", 400, "request body must be a JSON object"),
    ("truncated-json", C, b'{"prompt": "x"', 400, "request body is not valid JSON"),
    ("nested-40", C, b'{"prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nested"),
    ("nested-100k", C, b"[" * 100_000 + b"]" * 100_000, 400, "nested deeper than 32 levels"),
    ("nested-100k-in-object", C, b'{"a":' + b"[" * 100_000, 400, "request body is n"),
    # chat
    ("empty-messages", CHAT, {"messages": []}, 400, "messages: List should have at least 1"),
    ("string-messages", CHAT, {"messages": "hi"}, 400, "messages: Input should be a valid list"),
    ("bad-role", CHAT, {"messages": [{"role": "root", "content": "x"}]}, 400, "messages.0.role"),
    ("int-content", CHAT, _chat(5), 400, "messages.0.content: Input should be"),
    ("int-text-part", CHAT, _chat([{"type": "text", "text": 5}]), 400, "text must be a string"),
    # sizes
    ("2-MiB-prompt", C, {"prompt": "a" * (2 * MIB)}, 413, "this server takes at most 1048576"),
    ("2-MiB-chat", CHAT, _chat("a" * (2 * MIB)), 413, "the text of the messages is 2097152 bytes"),
    ("7.5-MB-body", C, {"prompt": "\u00e9" * 3_750_000}, 413, "request body is"),
    ("2M-token-ids", C, {"prompt": [1] * 2_000_000}, 400, "the prompt is 2000000 tokens"),
    ("3M-token-ids", C, {"prompt": [1] * 3_000_000}, 413, "request body is"),
]


@pytest.mark.parametrize(
    ("path", "payload", "status", "says"),
    [h[1:] for h in HOSTILE],
    ids=[h[0] for h in HOSTILE],
)
def test_hostile_input_is_refused_alone(server, path, payload, status, says):
    got, body = server.post(path, payload)
    assert got == status, body
    assert says in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"
    assert server.get("/healthz")[0] == 200


def test_after_all_hostile_inputs_the_server_still_generates(server):
    status, body = server.post(C, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def _good(server) -> tuple[int, dict]:
    return server.post(C, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "seed": 1})


def test_bad_requests_do_not_fail_concurrent_good_ones(server):
    bad = [
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "seed": 2**64},
        b'{"prompt": "x", "temperature": NaN}',
        b"[" * 100_000,
        {"prompt": [10**9]},
        {"prompt": PROMPT, "stop": "s" * 1000},
    ]
    with ThreadPoolExecutor(len(bad) + 5) as pool:
        good = [pool.submit(_good, server) for _ in range(5)]
        refused = [pool.submit(server.post, C, b) for b in bad]
        good_results = [f.result(120) for f in good]
        refused_results = [f.result(120) for f in refused]
    assert all(status == 400 for status, _ in refused_results), refused_results
    assert "seed" in refused_results[0][1]["error"]["message"]
    assert [status for status, _ in good_results] == [200] * 5
    texts = {body["choices"][0]["text"] for _, body in good_results}
    assert len(texts) == 1  # same seed, same text: the bad ones did not disturb the batch


def test_probes_answer_quickly_while_a_huge_prompt_is_tokenized(server):
    words = " ".join(f"w{i % 9973}" for i in range(170_000))[: MIB - 100]  # just under the cap
    result: list = []
    sender = threading.Thread(target=lambda: result.append(server.post(C, {"prompt": words})))
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        t0 = time.monotonic()
        assert server.get("/healthz")[0] == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    sender.join()
    status, body = result[0]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert slowest < 1.0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_client_that_disconnects_stops_its_generation(server, stream):
    """The engine stops the request: the token counter stops well short of max_tokens."""
    _wait_for(lambda: server.metrics()[RUNNING] == 0, 60, "the server is still busy")
    before = server.metrics()[GEN]
    max_tokens = 1000
    body = json.dumps(
        {"prompt": "x", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        | ({"stream": True} if stream else {})
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    _wait_for(lambda: server.metrics()[GEN] > before, 60, "no tokens were generated")
    sock.close()
    _wait_for(lambda: server.metrics()[RUNNING] == 0, 10, "the generation was not stopped")
    stopped_at = server.metrics()[GEN] - before
    time.sleep(1.0)
    assert server.metrics()[GEN] - before == stopped_at  # nothing more is generated for it
    assert stopped_at < max_tokens
    assert server.post(C, {"prompt": "x", "max_tokens": 2})[0] == 200
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(served_checkpoint):
    s = Served(
        served_checkpoint,
        "--served-model-name",
        NAME,
        "--body-timeout",
        "1",
        env={"GPTQ_SERVE_API_KEY": KEY},
    )
    s.wait_ready()
    yield s
    assert s.stop() == 0, "".join(s.lines)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {KEY}x"},
    ],
    ids=["none", "wrong", "not-bearer", "empty", "longer"],
)
def test_api_key_is_required_on_v1(keyed, headers):
    status, body = keyed.post(C, OK, headers)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer <key>" in body["error"]["message"]
    assert keyed.get("/v1/models", headers)[0] == 401


def test_api_key_opens_v1_and_probes_stay_open(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed.post(C, OK, auth)[0] == 200
    assert keyed.get("/v1/models", auth)[0] == 200
    for probe in ("/healthz", "/readyz", "/health", "/metrics"):
        assert keyed.get(probe)[0] == 200, probe
    # the key is checked before the body: an unauthenticated client learns nothing of it
    assert keyed.post(C, b"{not json")[0] == 401


def test_a_body_that_never_arrives_gets_408(keyed):
    sock = socket.create_connection(("127.0.0.1", keyed.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{".encode()
    )
    t0 = time.monotonic()
    answer = sock.recv(65536).decode()
    sock.close()
    assert answer.startswith("HTTP/1.1 408") and "took over 1 s" in answer
    assert time.monotonic() - t0 < 10
    assert keyed.get("/healthz")[0] == 200


def test_api_key_flag(monkeypatch):
    from gptq_worker.cli import serve as cli_serve

    seen = {}
    monkeypatch.setattr("gptq_worker.serve.process.serve", lambda *a, **kw: seen.update(kw) or 0)
    monkeypatch.setenv("GPTQ_SERVE_API_KEY", "from-env")
    import argparse

    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "ckpt", "--api-key", "from-flag"])
    assert cli_serve.run(args) == 0 and seen["api_key"] == "from-flag"
    args = parser.parse_args(["serve", "ckpt", "--max-prompt-bytes", "10"])
    assert cli_serve.run(args) == 0
    assert seen["api_key"] == "from-env" and seen["max_prompt_bytes"] == 10


def test_engine_fails_only_the_request_it_cannot_prepare(served_checkpoint):
    """A value that slipped past validation (a seed torch refuses) fails its own request;
    the others in the same batch finish."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_checkpoint)
    engine = Engine(load_quantized_model(served_checkpoint), tokenizer, torch.device("cpu"))
    prompt = tokenizer(PROMPT).input_ids
    ends: dict[int, object] = {}
    done = threading.Event()

    def collector(i: int):
        def emit(chunk) -> None:
            if chunk.finish_reason is not None:
                ends[i] = chunk
                if len(ends) == 6:
                    done.set()

        return emit

    try:
        with engine._cv:  # all six are waiting when the engine takes its next batch
            engine.submit(Request(prompt, Sampling(8, 0.7, seed=2**64), collector(0)))
            for i in range(1, 6):
                engine.submit(Request(prompt, Sampling(8, 0.7, seed=i), collector(i)))
        assert done.wait(120)
    finally:
        engine.stop()
    assert ends[0].finish_reason == "error" and "Overflow" in ends[0].error
    assert all(ends[i].finish_reason in ("length", "stop") for i in range(1, 6))
