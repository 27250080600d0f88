"""``gptq-worker serve``'s engine speed: decode tokens/s at batch 1, 8 and 32 mixed lengths,
and the latency of short requests beside long ones (continuous batching).

Builds a model of a real shape with random weights (a tokenizer trained on stdlib text, so
the vocabulary is smaller than the real one), writes a GPTQ checkpoint with the engine
(round-to-nearest by default: speed does not depend on the values), loads it the way the
server does (``serve.model.load``: validation, packed ``QuantLinear`` modules, the engine
with its KV budget) and drives the engine directly, without HTTP:

- batch 1: one request; decode tokens/s from its first to its last token;
- batch 8: eight equal requests at once; generated tokens / wall seconds;
- 32 mixed: long requests start first, then medium and short ones arrive while the long
  ones decode; aggregate tokens/s, and p50/p95 end-to-end latency of the short requests,
  against the same short requests run alone (continuous batching keeps these close);
- ``--hf-reference``: transformers' own ``generate`` on the dequantized model in the
  serving dtype (fp16 on a GPU), batch 1 and 8, the same token counts.

Runs on a CPU (``--shape tiny``, the default there) or a GPU (``--shape llama-3-8b``).
Prints one JSON line per measurement and a summary; nothing is pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from speed import SHAPES, random_model

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.demo.models import stdlib_text, train_tokenizer
from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.generate import Chunk, Engine, Request, Sampling
from gptq_worker.serve.model import QuantLinear, load

TINY = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


class Job:
    def __init__(self, prompt: list[int], tokens: int, kind: str = "") -> None:
        self.kind, self.done, self.count = kind, threading.Event(), 0
        self.request = Request(
            prompt, Sampling(max_tokens=tokens, temperature=0, ignore_eos=True), self._emit
        )

    def _emit(self, chunk: Chunk) -> None:
        self.count = chunk.tokens
        if chunk.finish_reason is not None:
            self.finished = time.monotonic()
            self.done.set()

    @property
    def latency(self) -> float:
        return self.finished - self.request.arrived


def run(engine: Engine, jobs: list[Job], gaps: list[float] | None = None) -> float:
    """Submit ``jobs`` (after ``gaps[i]`` seconds each), wait for all; returns wall seconds."""
    start = time.monotonic()
    for i, job in enumerate(jobs):
        if gaps:
            time.sleep(gaps[i])
        job.request.arrived = job.request.times.arrived = time.monotonic()
        engine.submit(job.request)
    for job in jobs:
        job.done.wait()
    return time.monotonic() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build(args, work: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    text = stdlib_text(2_000_000 if args.shape != "tiny" else 400_000)
    tokenizer = train_tokenizer(text, 8192 if args.shape != "tiny" else 1024)
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    config = LlamaConfig(**{**shape, "vocab_size": len(tokenizer)})
    model = random_model(AutoModelForCausalLM, config)
    source = work / f"{args.shape}-fp16"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    del model
    (work / "calib.txt").write_text(text[:200_000])
    out = work / f"{args.shape}-w{args.bits}g{args.group_size}-{'asym' if args.asym else 'sym'}"
    quantize(
        WorkerConfig(
            model=str(source),
            output=str(out),
            device=args.device,
            overwrite=True,
            quantization=QuantizeConfig(
                bits=args.bits, group_size=args.group_size, sym=not args.asym, method=args.method
            ),
            calibration=CalibrationConfig(dataset=str(work / "calib.txt"), nsamples=8, seqlen=256),
        ),
        show_progress=False,
    )
    return out, tokenizer


def hf_reference(served, tokenizer, prompt, tokens: int, dtype) -> dict:
    """transformers' generate on the dequantized weights (nn.Linear), batch 1 and 8."""
    from gptq_worker.format.pack import dequantize_packed

    for name, m in list(served.named_modules()):
        if isinstance(m, QuantLinear):
            w = dequantize_packed(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, m.fmt)
            lin = torch.nn.Linear(m.in_features, m.out_features, m.bias is not None)
            lin = lin.to(device=m.qweight.device, dtype=dtype)
            lin.weight.data.copy_(w.to(dtype))
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.to(dtype))
            parent, _, child = name.rpartition(".")
            setattr(served.get_submodule(parent), child, lin)
    out = {}
    for batch in (1, 8):
        ids = torch.tensor([prompt] * batch, device=served.device)
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        served.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        _sync()
        t0 = time.monotonic()
        served.generate(ids, **kw)
        _sync()
        out[f"hf_generate_batch{batch}_tokens_per_s"] = round(
            batch * tokens / (time.monotonic() - t0), 2
        )
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> dict:
    import os

    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))

    out = {
        "cpu": cpu,
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work sharing the cores
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gptq-serve-speed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["tiny", *SHAPES], default=None)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--method", default="rtn", help="rtn (default, fast) or gptq")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128, help="decode tokens at batch 1 and 8")
    p.add_argument("--short", type=int, default=16, help="max_tokens of the short requests")
    p.add_argument("--long", type=int, default=512, help="max_tokens of the long requests")
    p.add_argument("--hf-reference", action="store_true")
    args = p.parse_args()
    args.shape = args.shape or ("tiny" if args.device == "cpu" else "llama-3-8b")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizer = build(args, work)
    loaded = load(checkpoint, "bench", args.device, max_batch=32, max_queue=256)
    engine = loaded.engine
    info = {**loaded.info, **machine(), "shape": args.shape, "vocab": len(tokenizer)}
    info["kv_cache_tokens"] = engine.kv_cache_tokens
    print(json.dumps({"setup": info}), flush=True)
    rng = random.Random(0)
    vocab = len(tokenizer)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    results: dict = {}
    run(engine, [Job(prompt(args.prompt_tokens), 8)])  # warm-up
    one = Job(prompt(args.prompt_tokens), args.tokens)
    run(engine, [one])
    t = one.request.times
    results["batch1_decode_tokens_per_s"] = round(
        (t.tokens - 1) / (t.last_token - t.first_token), 2
    )
    results["batch1_ttft_s"] = round(t.first_token - t.arrived, 4)
    jobs = [Job(prompt(args.prompt_tokens), args.tokens) for _ in range(8)]
    wall = run(engine, jobs)
    results["batch8_tokens_per_s"] = round(sum(j.count for j in jobs) / wall, 2)

    # 32 mixed: 8 long first, then 16 medium and 8 short arriving while the long ones run
    medium = max(args.short, args.long // 4)
    plan = [("long", args.long)] * 8 + [("medium", medium)] * 16 + [("short", args.short)] * 8
    tail = plan[8:]
    rng.shuffle(tail)
    plan = plan[:8] + tail
    lengths = [rng.randint(args.prompt_tokens // 2, args.prompt_tokens * 2) for _ in plan]
    jobs = [Job(prompt(n), m, kind) for (kind, m), n in zip(plan, lengths, strict=True)]
    gaps = [0.0] * 8 + [0.02] * 24
    wall = run(engine, jobs, gaps)
    results["mixed32_tokens_per_s"] = round(sum(j.count for j in jobs) / wall, 2)
    results["mixed32_wall_s"] = round(wall, 2)
    short = [j.latency for j in jobs if j.kind == "short"]
    results["mixed32_short_p50_s"] = round(pct(short, 0.5), 3)
    results["mixed32_short_p95_s"] = round(pct(short, 0.95), 3)
    results["mixed32_long_p50_s"] = round(
        pct([j.latency for j in jobs if j.kind == "long"], 0.5), 3
    )
    alone = []
    for j in jobs:
        if j.kind == "short":
            solo = Job(j.request.prompt_ids, args.short)
            run(engine, [solo])
            alone.append(solo.latency)
    results["short_alone_p50_s"] = round(pct(alone, 0.5), 3)
    results["short_alone_p95_s"] = round(pct(alone, 0.95), 3)
    results["mixed32_over_batch1"] = round(
        results["mixed32_tokens_per_s"] / results["batch1_decode_tokens_per_s"], 2
    )
    engine.stop()
    if args.hf_reference:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        results.update(
            hf_reference(engine.model, tokenizer, prompt(args.prompt_tokens), args.tokens, dtype)
        )
    print(json.dumps({"results": results}), flush=True)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
