"""Tiny models built from transformers configs, a tokenizer trained offline, calibration text."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.demo.models import stdlib_text, tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def corpus() -> str:
    return stdlib_text(300_000)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(corpus)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """``model_dir("llama", layers=2, ...)`` saves a tiny model (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **kwargs) -> Path:
        key = (model_type, repr(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type)
            model = tiny_model(model_type, len(tokenizer), **kwargs)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


def worker_config(
    model: Path,
    output: Path,
    calibration: Path,
    nsamples: int = 8,
    seqlen: int = 64,
    **quantization,
) -> WorkerConfig:
    return WorkerConfig(
        model=str(model),
        output=str(output),
        quantization=QuantizeConfig(**quantization),
        calibration=CalibrationConfig(dataset=str(calibration), nsamples=nsamples, seqlen=seqlen),
        device="cpu",
    )


def sample_ids(vocab: int, batch: int = 2, seqlen: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


# -- a real `gptq-worker serve` process, for the HTTP tests ------------------------------
NAME = "tiny-w4g32"


PROMPT = "def read_config(path):\n    "


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory, model_dir, calibration_file) -> Path:
    """A 4-bit g32 checkpoint of the tiny llama, for the tests that serve it over HTTP."""
    from gptq_worker.pipeline.run import quantize

    out = tmp_path_factory.mktemp("http") / NAME
    quantize(worker_config(model_dir("llama"), out, calibration_file, bits=4, group_size=32))
    return out


class Served:
    """A ``gptq-worker serve`` subprocess on a free port."""

    def __init__(self, checkpoint: Path, *flags: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gptq_worker.cli",
                "serve",
                str(checkpoint),
                "--port",
                "0",
                "--device",
                "cpu",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(self._wait_for(r"listening on http://[^:]+:(\d+)").group(1))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server's output:\n{''.join(self.lines)}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError("".join(self.lines))

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data, resp

    def get(self, path: str, headers=None):
        status, data, _ = self.request("GET", path, headers=headers)
        return status, data

    def post(self, path: str, payload, headers=None) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        status, data, _ = self.request("POST", path, body, headers)
        return status, json.loads(data)

    def stream(self, path: str, payload: dict) -> list:
        """The parsed ``data:`` events of a streamed response (``[DONE]`` kept as a string)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(
            "POST",
            path,
            json.dumps({**payload, "stream": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = [
            line[len("data: ") :]
            for line in resp.read().decode().split("\n\n")
            if line.startswith("data: ")
        ]
        conn.close()
        return [e if e == "[DONE]" else json.loads(e) for e in events]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, data = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(data.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


@pytest.fixture(scope="module")
def server(served_checkpoint):
    """``gptq-worker serve`` on the shared checkpoint: one process per test module."""
    s = Served(served_checkpoint, "--served-model-name", NAME)
    s.wait_ready()
    yield s
    assert s.stop() == 0, "".join(s.lines)
