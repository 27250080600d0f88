"""``gptq-worker quickstart``: the whole engine on one machine, offline, in a few minutes.

Trains a small Llama-style model on Python standard-library source (no download),
quantizes it with GPTQ and with round-to-nearest, validates the checkpoint, compares
perplexities on held-out text, then serves the GPTQ checkpoint with ``gptq-worker serve``,
asks it for a completion and a chat reply, prints a few of its metrics and stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from gptq_compat.config import CalibrationConfig, Method, QuantizeConfig, WorkerConfig
from gptq_compat.rules import sm_text
from gptq_worker.demo.models import build_demo_model
from gptq_worker.eval.perplexity import evaluate
from gptq_worker.format.validate import validate_checkpoint
from gptq_worker.pipeline.run import quantize


def run_quickstart(
    workdir: str | Path, bits: int = 4, group_size: int = 128, train_steps: int = 300
) -> dict:
    workdir = Path(workdir).expanduser().resolve()
    device = torch.device("cpu")
    started = time.monotonic()
    demo = workdir / "demo"
    if (demo / "model" / "config.json").exists():
        print(f"[1/5] reusing the demo model in {demo / 'model'}")
        paths = {
            "model": demo / "model",
            "calibration": demo / "calibration.txt",
            "eval": demo / "eval.txt",
        }
    else:
        print(f"[1/5] training a small Llama-style model on stdlib text ({train_steps} steps)")
        paths = build_demo_model(demo, steps=train_steps)

    results = {}
    for method in (Method.RTN, Method.GPTQ):
        out = workdir / f"{method.value}-w{bits}g{group_size}"
        print(
            f"[2/5] quantizing with {method.value.upper()} ({bits}-bit, group {group_size}) "
            f"-> {out}"
        )
        cfg = WorkerConfig(
            model=str(paths["model"]),
            output=str(out),
            device="cpu",
            overwrite=True,
            quantization=QuantizeConfig(bits=bits, group_size=group_size, method=method),
            calibration=CalibrationConfig(
                dataset=str(paths["calibration"]), nsamples=128, seqlen=256
            ),
        )
        quantize(cfg, show_progress=True)
        results[method.value] = out

    checkpoint = results["gptq"]
    report = validate_checkpoint(checkpoint)
    print(
        f"[3/5] validate {checkpoint}: {'OK' if not report.errors else 'FAILED'} "
        f"({len(report.modules)} quantized modules)"
    )
    for v in report.verdicts:
        why = "" if v.loads else ": " + "; ".join(v.reasons)
        print(f"      {'yes' if v.loads else 'no '} {v.kernel.name:20s} [{sm_text(v.kernel)}]{why}")

    print("[4/5] perplexity on held-out stdlib files (lower is better)")
    ppl = {}
    for name, target in (
        ("fp16", paths["model"]),
        ("rtn", results["rtn"]),
        ("gptq", results["gptq"]),
    ):
        r = evaluate(str(target), str(paths["eval"]), 256, device, torch.float32, 60)
        ppl[name] = r["perplexity"]
        print(f"      {name:5s} {r['perplexity']:10.3f}  ({r['tokens']} tokens)")
    gap = ppl["rtn"] - ppl["fp16"]
    closed = (ppl["rtn"] - ppl["gptq"]) / gap if gap > 0 else float("nan")
    print(f"      GPTQ closes {closed:.0%} of round-to-nearest's perplexity gap to fp16.")

    print(f"[5/5] serving {checkpoint} with gptq-worker serve")
    served = serve_and_ask(checkpoint)
    summary = {
        "perplexity": ppl,
        "gap_closed_by_gptq": round(closed, 3),
        "checkpoint": str(checkpoint),
        "kernels": report.loadable_kernels(),
        "served": served,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    return summary


COMPLETION_PROMPT = "def read_lines(path):\n    "
METRICS_SHOWN = (
    "gptq_serve_model_info",
    "gptq_serve_model_weight_bytes",
    "gptq_serve_requests_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:time_to_first_token_seconds_sum",
)


def serve_and_ask(checkpoint: Path, timeout: float = 180) -> dict:
    """Run ``gptq-worker serve`` on a free local port, query it, stop it with SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptq_worker.cli", "serve", str(checkpoint), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        url = _wait_listening(proc, lines, timeout)
        _wait_ready(url, proc, lines, timeout)
        completion = _post(
            f"{url}/v1/completions",
            {"prompt": COMPLETION_PROMPT, "max_tokens": 48, "temperature": 0, "stop": ["\n\n"]},
        )
        text = completion["choices"][0]["text"]
        print(f"      POST /v1/completions  prompt {COMPLETION_PROMPT!r}")
        print("      answer: " + (COMPLETION_PROMPT + text).replace("\n", "\n              "))
        messages = [{"role": "user", "content": "open a file and count its lines"}]
        chat = _post(
            f"{url}/v1/chat/completions",
            {"messages": messages, "max_tokens": 32, "temperature": 0.7, "seed": 0},
        )
        reply = chat["choices"][0]["message"]["content"]
        print(f"      POST /v1/chat/completions  {messages[0]['content']!r}")
        print("      reply:  " + reply.replace("\n", "\n              "))
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        shown = [ln for ln in metrics.splitlines() if ln.startswith(METRICS_SHOWN)]
        print("      GET /metrics (excerpt):")
        for line in shown:
            print("        " + line)
        packed = _metric(metrics, 'gptq_serve_model_weight_bytes{form="packed"}')
        fp16 = _metric(metrics, 'gptq_serve_model_weight_bytes{form="fp16"}')
        print(
            f"      quantized layers in memory: {packed / 2**20:.2f} MiB packed vs "
            f"{fp16 / 2**20:.2f} MiB in fp16 ({packed / fp16:.1%})"
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    if code != 0:
        raise RuntimeError(f"gptq-worker serve exited {code}:\n{''.join(lines)}")
    print("      server stopped (SIGTERM, exit 0)")
    return {
        "completion": text,
        "chat": reply,
        "usage": completion["usage"],
        "packed_bytes": int(packed),
        "fp16_bytes": int(fp16),
    }


def _wait_listening(proc: subprocess.Popen, lines: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if m := re.search(r"listening on (http://\S+)", line):
                return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("gptq-worker serve did not start:\n" + "".join(lines))


def _wait_ready(url: str, proc: subprocess.Popen, lines: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise RuntimeError("gptq-worker serve did not become ready:\n" + "".join(lines))


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise RuntimeError(f"/metrics has no {name}")
