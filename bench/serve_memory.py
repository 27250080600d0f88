"""``gptq-worker serve``'s model on a GPU: memory of the packed model against fp16, decode speed.

Builds a Llama-3.2-1B-shaped model with random weights (a tokenizer trained on stdlib text,
so the vocabulary is smaller than the real one), writes a 4-bit g128 checkpoint with the
engine, loads it the way the server does, and prints GPU memory after loading the fp16
model and the packed one, and greedy decode tokens per second at batch 1 and 8 (the
portable torch kernel: unpacks each layer's codes in every forward).
"""

from __future__ import annotations

import argparse
import gc
import json
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
from gptq_worker.serve.model import QuantLinear, load_quantized_model


def gpu_bytes() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def decode_rate(engine: Engine, prompt: list[int], batch: int, tokens: int) -> float:
    done = threading.Semaphore(0)

    def emit(chunk: Chunk) -> None:
        if chunk.finish_reason is not None:
            done.release()

    start = time.perf_counter()
    for _ in range(batch):
        engine.submit(Request(prompt, Sampling(max_tokens=tokens, temperature=0), emit))
    for _ in range(batch):
        done.acquire()
    return batch * tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gptq-serve-bench")
    p.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = stdlib_text(2_000_000)
    tokenizer = train_tokenizer(text, 8192)
    config = LlamaConfig(**{**SHAPES[args.shape], "vocab_size": len(tokenizer)})
    config.eos_token_id = -1  # never stop early: every request decodes all its tokens
    model = random_model(AutoModelForCausalLM, config)
    source = work / "fp16"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (work / "calib.txt").write_text(text[:400_000])
    out = work / "w4g128"
    quantize(
        WorkerConfig(
            model=str(source),
            output=str(out),
            device="cuda",
            overwrite=True,
            quantization=QuantizeConfig(bits=4, group_size=128),
            calibration=CalibrationConfig(dataset=str(work / "calib.txt"), nsamples=16, seqlen=512),
        ),
        show_progress=False,
    )
    del model
    base = gpu_bytes()
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).cuda()
    dense_bytes = gpu_bytes() - base
    linear = sum(
        m.weight.numel() * 2
        for n, m in dense.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    del dense
    base = gpu_bytes()
    served = load_quantized_model(out, torch.float16, "cuda")
    served_bytes = gpu_bytes() - base
    layers = [m for m in served.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.packed_bytes() for m in layers)
    engine = Engine(served, tokenizer, torch.device("cuda"), max_batch=8)
    prompt = tokenizer("def main(argv):\n    ").input_ids
    decode_rate(engine, prompt, 1, 8)  # warm-up
    rates = {f"batch{b}": round(decode_rate(engine, prompt, b, 64), 1) for b in (1, 8)}
    engine.stop()
    result = {
        "shape": args.shape,
        "vocab": len(tokenizer),
        "gpu_bytes_fp16_model": dense_bytes,
        "gpu_bytes_w4g128_model": served_bytes,
        "whole_model_ratio": round(served_bytes / dense_bytes, 3),
        "decoder_linear_bytes_fp16": linear,
        "decoder_linear_bytes_packed": packed,
        "linear_ratio": round(packed / linear, 3),
        "decode_tokens_per_s": rates,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
