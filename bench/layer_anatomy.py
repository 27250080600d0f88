"""Where one decoder layer's time goes: forwards, attention backend, Hessians, the solve.

A diagnostic for the engine's per-layer phases on one decoder layer of a real shape
(random fp16 weights), with the arguments the engine itself captures (capture.py), one
batch of ``--batch`` x ``--seqlen`` tokens. Times are medians of CUDA-event timings after
a warm-up; each line also gives the achieved TFLOP/s where the operation count is plain.
Run on the GPU machine: ``python bench/layer_anatomy.py --shape llama-3-8b``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SHAPES, random_model

from gptq_worker.arch import architecture_for
from gptq_worker.pipeline.capture import capture_inputs
from gptq_worker.quant.gptq import (
    gptaq_correction,
    gptaq_correction_rows,
    gptq_quantize,
    inverse_hessian_cholesky,
    tf32_parts,
)
from gptq_worker.quant.hessian import AsymmetricHessian


def timed(fn, reps: int = 5) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up (CUDA events; on a
    CPU, for a smoke test, the wall clock)."""
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def old_inverse(H: torch.Tensor) -> torch.Tensor:
    """The factor as computed before: Cholesky, cholesky_inverse, Cholesky again."""
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(Hd)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-3-8b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--scale", type=int, default=1, help="divide the shape's widths (smoke test)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(SHAPES[args.shape], num_hidden_layers=1, vocab_size=1024)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        shape[key] //= args.scale
    config = LlamaConfig(**shape, max_position_embeddings=max(4096, args.seqlen))
    model = random_model(AutoModelForCausalLM, config)
    arch = architecture_for(model)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(0, 1024, (args.batch, args.seqlen))
    acts = capture_inputs(model, arch, [ids], dev)
    layer = model.get_submodule(arch.layers)[0].to(dev)
    h, a, kw = acts.hidden[0], acts.args[0][0], acts.kwargs[0][0]
    tokens = args.batch * args.seqlen
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    linear = hidden * (hidden + 2 * kv * head_dim) + hidden * hidden + 3 * hidden * inter
    attn_flops = 4 * args.seqlen * args.seqlen * hidden * args.batch / 2  # causal
    out: dict = {
        "shape": args.shape,
        "tokens": f"{args.batch}x{args.seqlen}",
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "mask": None if kw.get("attention_mask") is None else list(kw["attention_mask"].shape),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }

    def rate(flops: float, s: float) -> float:
        return round(flops / s / 1e12, 1)

    with torch.no_grad():
        s = timed(lambda: layer(h, *a, **kw))
        out["layer_forward_s"] = round(s, 4)
        out["layer_forward_tflops"] = rate(2 * linear * tokens + attn_flops, s)
        x = layer.input_layernorm(h)
        s = timed(lambda: layer.self_attn(hidden_states=x, **kw))
        out["attention_module_s"] = round(s, 4)
        dt = h.dtype
        q = torch.randn(args.batch, heads, args.seqlen, head_dim, device=dev, dtype=dt)
        k = torch.randn(args.batch, kv, args.seqlen, head_dim, device=dev, dtype=dt)
        s = timed(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, k, is_causal=True, enable_gqa=True
            )
        )
        out["sdpa_causal_gqa_s"] = round(s, 4)
        out["sdpa_causal_gqa_tflops"] = rate(attn_flops, s)
        y = layer.post_attention_layernorm(h)
        s = timed(lambda: layer.mlp(y))
        out["mlp_s"] = round(s, 4)
        out["mlp_tflops"] = rate(2 * 3 * hidden * inter * tokens, s)
        for n, src in ((hidden, h), (inter, None)):
            xs = src if src is not None else torch.randn(tokens, n, device=dev, dtype=h.dtype)
            xf = xs + 0.01
            acc = AsymmetricHessian(n, dev)
            s = timed(lambda acc=acc, xs=xs, xf=xf: acc.add_pair(xs, xf))
            out[f"hessian_pair_{n}_s"] = round(s, 4)
            out[f"hessian_pair_{n}_tflops"] = rate(2 * 2 * n * n * tokens, s)
            del acc
        # the solve of down_proj: [hidden, inter] weight, [inter, inter] Hessian
        g = torch.Generator(device=dev).manual_seed(0)
        X = torch.randn(2 * inter, inter, device=dev, generator=g)
        H = (X.t() @ X) / (2 * inter)
        H.diagonal().add_(1e-2)
        D = 0.01 * torch.randn(inter, inter, device=dev, generator=g)
        W = torch.randn(hidden, inter, device=dev, generator=g) * 0.02
        del X
        out["inverse_factor_old_s"] = round(timed(lambda: old_inverse(H), 3), 4)
        out["inverse_factor_new_s"] = round(
            timed(lambda: inverse_hessian_cholesky(H, 0.01, 0.0025), 3), 4
        )
        U, _ = inverse_hessian_cholesky(H, 0.01, 0.0025)
        ref = old_inverse(H)
        out["inverse_factor_new_vs_old_rel"] = float((U - ref).norm() / ref.norm())
        del ref
        out["gptaq_correction_whole_s"] = round(
            timed(lambda U=U: gptaq_correction(D, U, 0.25), 3), 4
        )
        del U
        # GPTAQ's correction rows of the first block (the widest), 3xTF32 and fp32 products,
        # against fp64
        U, _ = inverse_hessian_cholesky(H, 0.01, 0.0025)
        ref = gptaq_correction_rows(D.double(), U.double(), 0.25, 0, 128)
        for name, factor in (("fp32", U), ("3xtf32", tf32_parts(U))):
            got = gptaq_correction_rows(D, factor, 0.25, 0, 128)
            out[f"gptaq_rows_{name}_rel_err"] = float((got.double() - ref).norm() / ref.norm())
            out[f"gptaq_rows_{name}_s"] = round(
                timed(lambda f=factor: gptaq_correction_rows(D, f, 0.25, 0, 128), 3), 5
            )
        del U, ref
        kwq = dict(bits=4, group_size=128, sym=True, desc_act=True, static_groups=True)
        results = {}
        for split in (False, True):
            name = "3xtf32" if split else "fp32"
            for how, extra in (("plain", {}), ("gptaq", {"dXXT": D, "gptaq_alpha": 0.25})):
                out[f"solve_down_{how}_{name}_s"] = round(
                    timed(
                        lambda e=extra, sp=split: gptq_quantize(
                            W, H, split_products=sp, **e, **kwq
                        ),
                        3,
                    ),
                    4,
                )
            results[name] = gptq_quantize(W, H, dXXT=D, split_products=split, **kwq)
        out["solve_down_gptaq_codes_same"] = float(
            (results["fp32"].codes == results["3xtf32"].codes).float().mean()
        )
        out["solve_down_gptaq_loss_ratio"] = results["3xtf32"].loss / results["fp32"].loss
        if dev.type == "cuda":
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
