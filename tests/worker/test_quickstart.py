"""The README's first command, as a user runs it: ``gptq-worker quickstart`` (default settings)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


def test_quickstart_trains_quantizes_validates_serves_and_stops(tmp_path):
    exe = shutil.which("gptq-worker")
    if exe is None:
        pytest.fail("gptq-worker is not on PATH: install with pip install -e '.[worker]'")
    done = subprocess.run(
        [exe, "quickstart", "--workdir", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    assert "validate" in out and ": OK (" in out
    assert "answer: def read_lines(path):" in out
    assert 'gptq_serve_requests_total{endpoint="/v1/completions",status="200"} 1.0' in out
    assert "server stopped (SIGTERM, exit 0)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    ppl = summary["perplexity"]
    assert ppl["gptq"] < ppl["rtn"]  # GPTQ beats round-to-nearest on held-out text
    served = summary["served"]
    assert served["usage"]["completion_tokens"] >= 1
    assert 0.25 < served["packed_bytes"] / served["fp16_bytes"] < 0.30
    assert "builtin/torch" in summary["kernels"]
