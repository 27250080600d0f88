"""The real vLLM decides: each checkpoint variant our engine writes is loaded by vLLM 0.32.0
(the CPU build), and vLLM's accept or refuse must equal our rule's verdict
(``gptq_compat.engines.vllm``, kernel ``vllm/cpu``). Where vLLM loads a variant, its greedy
tokens must equal those of our own runtime's model, and its per-position log-probabilities
must differ from ours by no more than the noise of float16 arithmetic, which the same test
measures on the unquantized model (vLLM in float16 against transformers in float32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptq_compat.config import CheckpointFormat
from gptq_compat.engines.vllm import VLLM_0_32
from gptq_compat.rules import judge
from gptq_worker.demo.models import build_demo_model
from gptq_worker.format.checkpoint import read_quantize_config
from gptq_worker.format.validate import validate_checkpoint
from gptq_worker.pipeline.run import quantize
from gptq_worker.serve.model import load_quantized_model

from .conftest import TABLE

pytestmark = pytest.mark.engines
PROBE = Path(__file__).with_name("vllm_probe.py")
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 64, 32

# name -> quantization settings beyond the engine's defaults (static act-order and GPTAQ)
VARIANTS: dict[str, dict] = {
    "w4g128": {"bits": 4, "group_size": 128},
    "w8g128": {"bits": 8, "group_size": 128},
    "w4g128-asym": {"bits": 4, "group_size": 128, "sym": False},
    "w3g128": {"bits": 3, "group_size": 128},
    "w2g128": {"bits": 2, "group_size": 128},
    "w4-per-channel": {"bits": 4, "group_size": -1},
    "w4g32": {"bits": 4, "group_size": 32},
    "w4g64": {"bits": 4, "group_size": 64},
    "w4g128-act-order": {"bits": 4, "group_size": 128, "desc_act": True, "static_groups": False},
    "w4g128-plain-gptq": {"bits": 4, "group_size": 128, "desc_act": False, "gptaq": False},
    "w4g128-act-order-static": {
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
        "static_groups": True,
    },
    "w4g128-v2": {"bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"},
    "w4g128-asym-v2": {
        "bits": 4,
        "group_size": 128,
        "sym": False,
        "checkpoint_format": "gptq_v2",
    },
    "w4g128-dynamic-mlp-g64": {
        "bits": 4,
        "group_size": 128,
        "dynamic": {r"+:.*\.mlp\..*": {"group_size": 64}},
    },
    "w4g128-dynamic-skip-v": {"bits": 4, "group_size": 128, "dynamic": {r"-:.*\.v_proj": {}}},
    "w4g128-lm-head": {"bits": 4, "group_size": 128, "lm_head": True},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """A small Llama trained on standard-library source (dimensions multiples of 128)."""
    return build_demo_model(tmp_path_factory.mktemp("engines-demo"), steps=300, log_every=0)


@pytest.fixture(scope="module")
def prompts(demo) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo["model"])
    ids = tokenizer(demo["eval"].read_text(), add_special_tokens=False).input_ids
    stride = len(ids) // PROMPTS
    return [ids[i * stride : i * stride + PROMPT_LEN] for i in range(PROMPTS)]


@pytest.fixture(scope="module")
def checkpoints(demo, tmp_path_factory) -> dict[str, Path]:
    from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig

    root = tmp_path_factory.mktemp("engines-checkpoints")
    out = {}
    for name, settings in VARIANTS.items():
        cfg = WorkerConfig(
            model=str(demo["model"]),
            output=str(root / name),
            quantization=QuantizeConfig(**settings),
            calibration=CalibrationConfig(
                dataset=str(demo["calibration"]), nsamples=32, seqlen=128
            ),
            device="cpu",
        )
        out[name] = quantize(cfg, show_progress=False)
    return out


def _run_probe(python: str, requests: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [python, str(PROBE), "-"],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def _ours(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens (full recompute, as many as vLLM generates) and the log-probability of
    each prompt's actual next token at positions 1..len-1."""
    tokens, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        logits = model(ids).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        logprobs.append(lp.tolist())
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )
        tokens.append(out[0, len(prompt) :].tolist())
    return tokens, logprobs


def _diff(a: list[list[float]], b: list[list[float]]) -> tuple[float, float, int]:
    """(max, mean) absolute difference and the number of positions compared."""
    d = torch.tensor([x for row in a for x in row]) - torch.tensor([x for row in b for x in row])
    return d.abs().max().item(), d.abs().mean().item(), d.numel()


# vLLM 0.32.0's CPU build has its GPTQ matmul (torch.ops._C.cpu_gemm_wna16) only in
# _C_AVX512.abi3.so; vllm/platforms/cpu.py (lines 639-657) imports _C_AVX2 on a CPU without
# AVX-512, and a GPTQ model it has accepted and loaded then fails at its first forward with
# "no attribute 'cpu_gemm_wna16'". On such a CPU (AMD EPYC machines without AVX-512, seen
# here) the tier still checks every verdict, counting that failure as vLLM's acceptance,
# but cannot compare tokens; it says so in its table.
CPU_KERNEL_MISSING = "cpu_gemm_wna16"


def test_vllm_accepts_exactly_what_our_rules_accept(vllm_python, demo, checkpoints, prompts):
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    base = {"prompts": prompts, "max_tokens": NEW_TOKENS, "max_model_len": 256}
    requests = [
        {**base, "checkpoint": str(demo["model"]), "dtype": "float16"},
        *({**base, "checkpoint": str(path), "dtype": "float16"} for path in checkpoints.values()),
    ]
    answers = _run_probe(vllm_python, requests)
    floor_answer, *variant_answers = answers

    # noise floor: the unquantized model, vLLM float16 against transformers float32
    dense = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.float32).eval()
    dense_tokens, dense_lp = _ours(dense, prompts)
    assert floor_answer["loaded"], floor_answer
    noise_max, noise_mean, positions = _diff(floor_answer["prompt_logprobs"], dense_lp)
    assert positions >= 500
    TABLE.append(
        f"noise floor (unquantized, vLLM fp16 vs transformers fp32): max {noise_max:.4f}, "
        f"mean {noise_mean:.5f} over {positions} positions; greedy tokens equal on "
        f"{sum(a == b for a, b in zip(floor_answer['tokens'], dense_tokens, strict=True))}"
        f"/{PROMPTS} prompts"
    )
    TABLE.append(
        f"{'variant':26s} {'vLLM':7s} {'our rule':9s} {'tokens':9s} logprob |diff| max/mean"
    )
    mismatched, disagreements, not_run = [], [], []
    avx512 = torch.cpu._is_avx512_supported()
    for (name, path), answer in zip(checkpoints.items(), variant_answers, strict=True):
        report = validate_checkpoint(path)
        assert not report.errors, (name, report.errors)
        fmt = read_quantize_config(path).checkpoint_format
        verdict = next(
            v
            for v in judge(VLLM_0_32, report.modules, CheckpointFormat(fmt))
            if v.kernel.name == "vllm/cpu"
        )
        kernel_missing = not answer["loaded"] and CPU_KERNEL_MISSING in (answer.get("error") or "")
        if kernel_missing:
            # accepted and loaded; only the execution needs AVX-512 (see CPU_KERNEL_MISSING)
            assert not avx512, (name, answer.get("error"))
            not_run.append(name)
        vllm_says = "loads" if answer["loaded"] or kernel_missing else "refuses"
        ours_says = "loads" if verdict.loads else "refuses"
        if vllm_says != ours_says:
            mismatched.append(
                f"{name}: vLLM {vllm_says} ({answer.get('error')}), our rule {ours_says} "
                f"({verdict.reasons})"
            )
        row = f"{name:26s} {vllm_says:7s} {ours_says:9s}"
        if answer["loaded"]:
            model32 = load_quantized_model(path, torch.float32)
            tokens32, lp32 = _ours(model32, prompts)
            tokens16, _ = _ours(load_quantized_model(path, torch.float16), prompts)
            # a prompt whose greedy path our own fp16 and fp32 runs disagree on sits on a
            # near-tie: there the engines' arithmetic, not their reading, decides
            decided = [i for i in range(PROMPTS) if tokens32[i] == tokens16[i]]
            equal = [i for i in decided if answer["tokens"][i] == tokens32[i]]
            lp_max, lp_mean, n = _diff(answer["prompt_logprobs"], lp32)
            row += f" {len(equal)}/{len(decided):<7} {lp_max:.4f} / {lp_mean:.5f} ({n} positions)"
            if len(equal) != len(decided) or len(decided) < PROMPTS - 1:
                disagreements.append(f"{name}: greedy tokens equal on {len(equal)}/{len(decided)}")
            if lp_max > 3 * noise_max or lp_mean > 2 * noise_mean:
                disagreements.append(
                    f"{name}: logprobs differ by max {lp_max:.4f} / mean {lp_mean:.5f}, "
                    f"above the noise floor's 3x max {noise_max:.4f} / 2x mean {noise_mean:.5f}"
                )
        elif kernel_missing:
            row += f" {'-':9s} accepted and loaded; not run: no AVX-512 on this CPU"
        else:
            row += f" {'-':9s} {answer.get('error', '')[:70]}"
        TABLE.append(row)
    if not_run:
        TABLE.append(
            f"NOT COMPARED: {len(not_run)} variants vLLM accepted could not run on this CPU "
            "(no AVX-512: vLLM 0.32.0's CPU build has no GPTQ kernel for it), so their tokens "
            "and log-probabilities were not compared; their verdicts were"
        )
    TABLE.append(
        f"engines tier wall time (probe and comparisons): {time.monotonic() - started:.0f} s"
    )
    print("\n".join(TABLE), file=sys.stderr)
    assert not mismatched, mismatched
    assert not disagreements, disagreements
