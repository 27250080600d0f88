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
  against the same short requests run alone (continuous batching keeps these close); a
  burst of 32 requests in all, of which the 8 long ones decode alone most of the time;
- 32 concurrent (``--clients 32``): 32 clients each keep one request of a mixed length
  in flight (closed loop, a new request as soon as the last ended) for
  ``--concurrent-seconds``; aggregate decode tokens/s while all are busy, short requests'
  p50/p95 latency;
- ``--hf-reference``: transformers' own ``generate`` on the dequantized model in the
  serving dtype (fp16 on a GPU), batch 1 and 8, the same token counts.

Runs on a CPU (``--shape tiny``, the default there) or a GPU (``--shape llama-3-8b``).
On a GPU the checkpoints of larger shapes are written by a quick round-to-nearest here
(``quick_rtn``: speed does not depend on the values; the engine's own quantizer takes
minutes for 8B), one per ``--configs`` entry (``4:sym,4:asym,3:sym``), from one random
fp16 model; each is loaded the way the server loads it. Before any timing, the fused
kernel is compared with the torch reference on real layers of the loaded model (the bench
stops if they differ), and the static runtime's prefill logits with the transformers
forward of the same quantized model. ``--hf-reference`` then times transformers'
``generate`` on the unquantized fp16 model (batch 1 and 8).

Prints one JSON line per measurement and a summary; nothing is pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from gptq_worker.format.checkpoint import write_checkpoint
from gptq_worker.format.pack import pack_qweight, pack_qzeros
from gptq_worker.kernels import gptq_triton as kernels
from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.generate import Chunk, Engine, Request, Sampling
from gptq_worker.serve.model import DTYPES, QuantLinear, load

TINY = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


class Job:
    def __init__(self, prompt: list[int], tokens: int, kind: str = "", ticks=None) -> None:
        self.kind, self.done, self.count = kind, threading.Event(), 0
        self.ticks = ticks  # a list to append (time, new tokens) to, or None
        self.request = Request(
            prompt, Sampling(max_tokens=tokens, temperature=0, ignore_eos=True), self._emit
        )

    def _emit(self, chunk: Chunk) -> None:
        if self.ticks is not None and chunk.tokens > self.count:
            self.ticks.append((time.monotonic(), chunk.tokens - self.count))
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


def concurrent(engine: Engine, args, vocab: int, seed: int) -> dict:
    """``args.clients`` clients, each keeping one request in flight (a new one as soon as
    its last ended: a closed loop, as load generators run a fixed concurrency) for
    ``args.concurrent_seconds``; lengths mixed as in the burst (a quarter long, half medium,
    a quarter short), prompts of half to twice ``--prompt-tokens``. Aggregate decode
    throughput: tokens generated between the first second and the end (every client busy),
    per second; short requests' end-to-end latency p50/p95; what is left in flight at the
    end is cancelled."""
    medium = max(args.short, args.long // 4)
    kinds = [("long", args.long), ("medium", medium), ("medium", medium), ("short", args.short)]
    ticks: list[tuple[float, int]] = []
    finished: list[Job] = []
    start = time.monotonic()
    end = start + args.concurrent_seconds
    live: dict[int, Job] = {}

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            kind, tokens = rng.choice(kinds)
            n = rng.randint(max(1, args.prompt_tokens // 2), args.prompt_tokens * 2)
            job = Job([rng.randrange(3, vocab) for _ in range(n)], tokens, kind, ticks)
            job.request.arrived = job.request.times.arrived = time.monotonic()
            live[i] = job
            engine.submit(job.request)
            job.done.wait()
            if job.request.times.tokens == tokens:  # ran to its length (not cancelled)
                finished.append(job)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for th in threads:
        th.start()
    time.sleep(max(0.0, end - time.monotonic()))
    for job in list(live.values()):
        job.request.cancelled.set()
    for th in threads:
        th.join()
    window = (start + min(1.0, args.concurrent_seconds / 4), end)
    tokens = sum(n for at, n in ticks if window[0] <= at < window[1])
    short = [j.latency for j in finished if j.kind == "short"]
    out = {
        f"concurrent{args.clients}_tokens_per_s": round(tokens / (window[1] - window[0]), 2),
        f"concurrent{args.clients}_requests_finished": len(finished),
    }
    if short:
        out[f"concurrent{args.clients}_short_p50_s"] = round(pct(short, 0.5), 3)
        out[f"concurrent{args.clients}_short_p95_s"] = round(pct(short, 0.95), 3)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def source_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    text = stdlib_text(2_000_000 if args.shape != "tiny" else 400_000)
    tokenizer = train_tokenizer(text, 8192 if args.shape != "tiny" else 1024)
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    config = LlamaConfig(**{**shape, "vocab_size": len(tokenizer)})
    return random_model(AutoModelForCausalLM, config), tokenizer, text


def quick_rtn(model, tokenizer, out: Path, bits: int, group_size: int, sym: bool) -> None:
    """Round-to-nearest of every decoder Linear on the model's device, packed by the
    engine's own packers and written by its checkpoint writer (v1 ``gptq`` format)."""
    from gptq_compat.config import CheckpointFormat

    packed = {}
    top = 2**bits - 1
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        w = m.weight.detach().float()  # [out, in]
        n, k = w.shape
        g = w.view(n, k // group_size, group_size)
        if sym:
            scale = (2 * g.abs().amax(-1) / top).clamp(min=1e-8)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / top).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(1, top)  # v1 stores zero - 1
        codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, top)
        codes = codes.view(n, k).to(torch.int32)
        packed[f"{name}.qweight"] = pack_qweight(codes, bits).cpu()
        packed[f"{name}.qzeros"] = pack_qzeros(
            zero.t().to(torch.int32), bits, CheckpointFormat.GPTQ
        ).cpu()
        packed[f"{name}.scales"] = scale.t().half().contiguous().cpu()
        packed[f"{name}.g_idx"] = (torch.arange(k, dtype=torch.int32) // group_size).cpu()
    cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, method="rtn")
    write_checkpoint(out, model, tokenizer, packed, cfg)


def build(args, work: Path, bits: int, sym: bool, source=None):
    if source is not None:  # the GPU path: quick RTN of the random model already built
        model, tokenizer = source
        out = work / f"{args.shape}-w{bits}g{args.group_size}-{'sym' if sym else 'asym'}"
        quick_rtn(model, tokenizer, out, bits, args.group_size, sym)
        return out, tokenizer
    model, tokenizer, text = source_model(args)
    source = work / f"{args.shape}-fp16"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    del model
    (work / "calib.txt").write_text(text[:200_000])
    out = work / f"{args.shape}-w{bits}g{args.group_size}-{'sym' if sym else 'asym'}"
    quantize(
        WorkerConfig(
            model=str(source),
            output=str(out),
            device=args.device,
            overwrite=True,
            quantization=QuantizeConfig(
                bits=bits, group_size=args.group_size, sym=sym, method=args.method
            ),
            calibration=CalibrationConfig(dataset=str(work / "calib.txt"), nsamples=8, seqlen=256),
        ),
        show_progress=False,
    )
    return out, tokenizer


def dense_copy(served, dtype):
    """``served`` with every QuantLinear replaced by an nn.Linear of its dequantized weight."""
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
    return served


def hf_reference(model, prompt, tokens: int) -> dict:
    """transformers' own ``generate`` (greedy, all ``tokens``), batch 1 and 8."""
    out = {}
    for batch in (1, 8):
        ids = torch.tensor([prompt] * batch, device=model.device)
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        _sync()
        t0 = time.monotonic()
        model.generate(ids, **kw)
        _sync()
        out[f"hf_generate_batch{batch}_tokens_per_s"] = round(
            batch * tokens / (time.monotonic() - t0), 2
        )
    return out


def check_kernels(model) -> dict:
    """The fused kernel against the torch reference on the loaded model's own layers, at
    decode and prefill row counts; raises if any differs beyond fp16 rounding."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    worst = 0.0
    for m in (layers[0], layers[len(layers) // 2], layers[-1]):
        w = m.packed()
        ref_w = kernels.reference_weight(w, torch.float32)
        got_w = kernels.dequantize(w, torch.float16).float()
        err = ((got_w - ref_w.half().float()).abs().max() / ref_w.abs().max()).item()
        if err > 0:
            raise AssertionError(f"dequantize kernel differs from the reference: {err}")
        for rows in (1, 7, 32, 200):
            x = torch.randn(rows, w.in_features, device=w.qweight.device, dtype=torch.float16)
            got = kernels.qmatmul(x, w).float()
            ref = x.float() @ ref_w.half().float()
            rel = ((got - ref).norm() / ref.norm()).item()
            worst = max(worst, rel)
            if not rel < 2e-3:
                raise AssertionError(f"fused kernel differs ({rows} rows): rel {rel}")
    return {"kernel_max_rel_err": float(f"{worst:.2e}")}


def check_static(engine, prompt: list[int]) -> dict:
    """The static runtime against transformers' forward of the same quantized model
    (prefill logits: our forward and cache against theirs; both run the fused GEMM), and
    one decode step as served (fused kernels replayed in a CUDA graph) against the torch
    step; raises if the decode step differs beyond fp16 rounding."""
    if engine.runtime != "static":
        return {}
    batch = engine._batch
    with torch.inference_mode():
        ref = engine.model(torch.tensor([prompt], device=engine.device)).logits[0, -1].float()
        got, _ = batch.prefill([prompt])
    got = got[0].float()
    out = {
        "static_prefill_logits_rel_err": float(f"{((got - ref).norm() / ref.norm()).item():.2e}"),
        "static_prefill_argmax_equal": bool(got.argmax() == ref.argmax()),
    }
    out.update(batch.self_check(prompt))
    if not out["decode_step_vs_torch_rel_err"] < 2e-2:
        raise AssertionError(f"the served decode step differs from the torch step: {out}")
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
        try:
            import triton

            out["triton"] = triton.__version__
        except ImportError:
            pass
    return out


def _allocated_gib() -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def _note(memory: dict, stage: str) -> None:
    """Live CUDA memory after a part of the profile, kept and printed at once (a later
    part that fails still leaves it in the log)."""
    memory[stage] = _allocated_gib()
    print(f"profile memory after {stage}: {memory[stage]} GiB", flush=True)


def _event_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile(args, engine: Engine, vocab: int, rng: random.Random) -> dict:
    """Where a step's time goes (``--profile``): every kernel configuration the tuner timed
    per layer shape and row bucket, the fp16 against the fp32 dequantization at the chosen
    ones, the GPU time of one fused step (graph replay) per token bucket, and the engine's
    wall time per step with n equal requests (the difference is the host's share)."""
    out: dict = {}
    memory: dict = {}  # live CUDA memory after each part
    _note(memory, "start")
    out["memory_allocated_gib"] = memory
    batch = engine._batch
    timings = {str(k): {str(c): t for c, t in v.items()} for k, v in kernels.TIMINGS.items()}
    out["tuner_timings_us"] = timings
    # fp16 vs fp32 dequantization at the tuned configurations
    weights: dict = {}
    for layer in batch.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            if lin.weight is not None:
                weights.setdefault(lin.weight.key(), []).append(lin.weight)
    half = {}
    for key, group in weights.items():
        group = group[:8]
        nbytes = sum(t.numel() * t.element_size() for t in
                     (group[0].qweight, group[0].scales, group[0].zeros))  # fmt: skip
        for rows in (1, 32):
            x = torch.randn(rows, group[0].in_features, device=engine.device, dtype=torch.float16)
            for flag in (True, False):
                saved = [w.half for w in group]
                for w in group:
                    w.half = flag and saved[0]
                calls = [functools.partial(kernels.fused_matmul, x, w, fp32=True) for w in group]
                t = kernels._graph_time(calls, repeats=7)
                for w, h in zip(group, saved, strict=True):
                    w.half = h
                half[f"{key} rows={rows} half={flag}"] = (
                    f"{t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s"
                )
    out["dequant_fp16_vs_fp32"] = half
    _note(memory, "dequant")
    # one fused step's GPU time per token bucket (graph replay; tokens at position ~300)
    steps = {}
    if batch.fused and batch.graphs:
        rows = batch.max_rows
        for bucket in batch.token_buckets:
            idx = torch.arange(bucket, device=engine.device)
            batch.slot_of[:bucket] = idx % rows
            batch.positions[:bucket] = 300 + idx // rows
            batch.tokens[:bucket] = 5
            batch.source.fill_(-1)
            batch.out_index.copy_(torch.arange(rows, device=engine.device) % bucket)
            graph, _ = batch._graph(bucket, batch.length_buckets[-1])
            steps[bucket] = round(_event_ms(graph.replay), 3)
            _note(memory, f"graph_{bucket}")
        # one row's step by its context (the attention's share grows with it)
        by_context = {}
        for position in (100, 500, 1000, 2000, 4000):
            if position >= batch.capacity:
                continue
            batch.slot_of[:1] = 0
            batch.positions[:1] = position
            batch.out_index.zero_()
            graph, _ = batch._graph(1, batch.length_buckets[-1])
            by_context[position] = round(_event_ms(graph.replay), 3)
        out["step_gpu_ms_one_row_by_context"] = by_context
        batch.positions.zero_()
        batch.slot_of.fill_(batch.scratch)
    out["step_gpu_ms_by_tokens"] = steps
    _note(memory, "step_graphs")
    # the engine's wall time per step with n equal requests (64 tokens each)
    wall = {}
    for n in (1, 8, 16, 32):
        jobs = [Job([rng.randrange(3, vocab) for _ in range(32)], 64) for _ in range(n)]
        t = run(engine, jobs)
        wall[n] = round(t / 64 * 1000, 3)
        while batch.rows:  # the last rows leave just after their last chunk
            time.sleep(0.01)
    out["engine_wall_ms_per_step_by_rows"] = wall
    _note(memory, "engine_runs")
    # the same with every step waiting for its tokens (no overlap of host and GPU)
    saved, engine.overlap = engine.overlap, False
    waiting = {}
    for n in (1, 32):
        jobs = [Job([rng.randrange(3, vocab) for _ in range(32)], 64) for _ in range(n)]
        t = run(engine, jobs)
        waiting[n] = round(t / 64 * 1000, 3)
        while batch.rows:
            time.sleep(0.01)
    engine.overlap = saved
    out["engine_wall_ms_per_step_by_rows_no_overlap"] = waiting
    _note(memory, "engine_runs_no_overlap")
    # prefill alone: one prompt (fused step, graph) and eight
    pre = {}
    for n, count in ((16, 1), (64, 1), (32, 8), (300, 1)):
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for _ in range(count)]
        pre[f"{count}x{n}"] = round(_event_ms(lambda p=prompts: batch.prefill(p), 5), 2)
        _note(memory, f"prefill_{count}x{n}")
    out["prefill_ms"] = pre
    return out


def measure(args, engine: Engine, vocab: int, rng: random.Random) -> dict:
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
    gaps = [0.0] * 8 + [args.gap] * 24
    wall = run(engine, jobs, gaps)
    results["mixed32_tokens_per_s"] = round(sum(j.count for j in jobs) / wall, 2)
    results["mixed32_wall_s"] = round(wall, 2)
    short = [j.latency for j in jobs if j.kind == "short"]
    results["mixed32_short_p50_s"] = round(pct(short, 0.5), 3)
    results["mixed32_short_p95_s"] = round(pct(short, 0.95), 3)
    results["mixed32_long_p50_s"] = round(
        pct([j.latency for j in jobs if j.kind == "long"], 0.5), 3
    )
    # the same short requests beside one long request, and alone
    beside, alone = [], []
    for j in jobs:
        if j.kind == "short":
            long_one = Job(prompt(args.prompt_tokens), args.long)
            engine.submit(long_one.request)
            time.sleep(args.gap * 5)
            solo = Job(j.request.prompt_ids, args.short)
            run(engine, [solo])
            beside.append(solo.latency)
            long_one.request.cancelled.set()
            long_one.done.wait()
    for j in jobs:
        if j.kind == "short":
            solo = Job(j.request.prompt_ids, args.short)
            run(engine, [solo])
            alone.append(solo.latency)
    results["short_beside_one_long_p50_s"] = round(pct(beside, 0.5), 3)
    results["short_beside_one_long_p95_s"] = round(pct(beside, 0.95), 3)
    results["short_alone_p50_s"] = round(pct(alone, 0.5), 3)
    results["short_alone_p95_s"] = round(pct(alone, 0.95), 3)
    results["mixed32_over_batch1"] = round(
        results["mixed32_tokens_per_s"] / results["batch1_decode_tokens_per_s"], 2
    )
    if args.clients:
        found = concurrent(engine, args, vocab, rng.randrange(1 << 30))
        results.update(found)
        results[f"concurrent{args.clients}_over_batch1"] = round(
            found[f"concurrent{args.clients}_tokens_per_s"] / results["batch1_decode_tokens_per_s"],
            2,
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gptq-serve-speed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["tiny", *SHAPES], default=None)
    p.add_argument("--configs", default="4:sym", help="bits:sym|asym, comma-separated")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--method", default="rtn", help="rtn (default, fast) or gptq (tiny only)")
    p.add_argument("--runtime", default="auto", choices=["auto", "static", "dynamic"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the serving dtype (auto: float16 on a GPU, float32 on a CPU; bfloat16 on a CPU "
        "takes torch's int4 kernel for 4-bit layers)",
    )
    p.add_argument(
        "--dynamic-batch1", type=int, default=0, help="also time the dynamic runtime at batch 1"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128, help="decode tokens at batch 1 and 8")
    p.add_argument("--short", type=int, default=16, help="max_tokens of the short requests")
    p.add_argument("--long", type=int, default=512, help="max_tokens of the long requests")
    p.add_argument("--gap", type=float, default=0.02, help="seconds between arrivals")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (0: not measured)")
    p.add_argument("--concurrent-seconds", type=float, default=8.0, help="how long the clients run")
    p.add_argument("--hf-reference", action="store_true")
    p.add_argument("--profile", action="store_true", help="also where a step's time goes")
    p.add_argument(
        "--profile-configs", default=None, help="profile only these (bits:sym|asym, ...)"
    )
    p.add_argument("--quick-rtn", action="store_true", help="quick_rtn also on a CPU / tiny")
    p.add_argument("--json", default=None, help="append every result line to this file")
    args = p.parse_args()
    args.shape = args.shape or ("tiny" if args.device == "cpu" else "llama-3-8b")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    configs = [
        (int(b), kind == "sym") for b, kind in (c.split(":") for c in args.configs.split(","))
    ]
    gpu_build = args.quick_rtn or (args.device.startswith("cuda") and args.shape != "tiny")
    source = None
    if gpu_build:
        t0 = time.monotonic()
        model, tokenizer, _ = source_model(args)
        source = (model.to(args.device), tokenizer)
        emit(args, {"built_fp16_s": round(time.monotonic() - t0, 1)})
    summary = {}
    for bits, sym in configs:
        label = f"w{bits}g{args.group_size}-{'sym' if sym else 'asym'}"
        try:
            t0 = time.monotonic()
            checkpoint, tokenizer = build(args, work, bits, sym, source)
            built = time.monotonic() - t0
            t0 = time.monotonic()
            loaded = load(checkpoint, "bench", args.device, max_batch=32, max_queue=256,
                          runtime=args.runtime, dtype=args.dtype)  # fmt: skip
            engine = loaded.engine
            info = {**loaded.info, **machine(), "shape": args.shape, "vocab": len(tokenizer)}
            info.update(label=label, kv_cache_tokens=engine.kv_cache_tokens,
                        build_s=round(built, 1), load_s=round(time.monotonic() - t0, 1),
                        memory_allocated_gib=_allocated_gib(),
                        tuned={str(k): v for k, v in engine.tuned.items()})  # fmt: skip
            emit(args, {"setup": info})
            rng = random.Random(0)
            checks = {}
            if args.device.startswith("cuda"):
                checks.update(check_kernels(engine.model))
            checks.update(
                check_static(engine, [rng.randrange(3, len(tokenizer)) for _ in range(40)])
            )
            emit(args, {"label": label, "checks": checks})
            results = measure(args, engine, len(tokenizer), rng)
            results["memory_allocated_gib"] = _allocated_gib()
            profiled = args.profile_configs is None or f"{bits}:{'sym' if sym else 'asym'}" in (
                args.profile_configs.split(",")
            )
            if args.profile and profiled:
                try:
                    found = profile(args, engine, len(tokenizer), rng)
                except Exception as err:  # the profile is extra: the measurements are in
                    import traceback

                    traceback.print_exc()
                    found = {"error": f"{type(err).__name__}: {err}"}
                emit(args, {"label": label, "profile": found})  # after the measurements: it
                # captures graphs and runs steps of its own that they should not inherit
            engine.stop()
            if args.dynamic_batch1:
                dyn = Engine(engine.model, tokenizer, engine.device, max_batch=1,
                             kv_cache_tokens=4096, runtime="dynamic")  # fmt: skip
                run(dyn, [Job([5] * args.prompt_tokens, 4)])
                one = Job([7] * args.prompt_tokens, args.dynamic_batch1)
                run(dyn, [one])
                t = one.request.times
                results["dynamic_batch1_decode_tokens_per_s"] = round(
                    (t.tokens - 1) / (t.last_token - t.first_token), 2
                )
                dyn.stop()
            if args.hf_reference and not gpu_build:
                dtype = engine.model.get_input_embeddings().weight.dtype  # the serving dtype
                dense = dense_copy(engine.model, dtype)
                results.update(hf_reference(dense, rng_prompt(rng, tokenizer, args), args.tokens))
            emit(args, {"label": label, "results": results})
            summary[label] = results
            del engine, loaded
            import gc

            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        except Exception as err:  # one configuration failing leaves the others to run
            import traceback

            traceback.print_exc()
            emit(args, {"label": label, "error": f"{type(err).__name__}: {err}"})
    if args.hf_reference and gpu_build:
        model, tokenizer = source
        ref = hf_reference(model, rng_prompt(random.Random(1), tokenizer, args), args.tokens)
        emit(args, {"label": "fp16", "results": ref})
        summary["fp16 (transformers generate)"] = ref
    for label, results in summary.items():
        print(f"== {label}")
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")


def rng_prompt(rng: random.Random, tokenizer, args) -> list[int]:
    return [rng.randrange(3, len(tokenizer)) for _ in range(args.prompt_tokens)]


def emit(args, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
