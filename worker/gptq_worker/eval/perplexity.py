"""``gptq-worker eval``: perplexity of a model or a GPTQ checkpoint on a text file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn


def is_gptq_checkpoint(directory: Path) -> bool:
    if (directory / "quantize_config.json").exists():
        return True
    config = directory / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def windows(ids: torch.Tensor, seqlen: int, max_samples: int | None = None) -> torch.Tensor:
    """The first non-overlapping ``seqlen`` windows of ``ids``: ``[n, seqlen]``."""
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of "
            f"{seqlen}; pass a longer text or a smaller --seqlen"
        )
    if max_samples:
        n = min(n, max_samples)
    return ids[: n * seqlen].view(n, seqlen)


def text_ids(path: str, tokenizer) -> torch.Tensor:
    text_file = Path(path)
    if not text_file.is_file():
        raise ValueError(f"evaluation text {path} does not exist")
    text = text_file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"evaluation text {path} is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.int64)


def window_nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Summed next-token NLL of ``[b, seq]`` windows (fp32 logits)."""
    return float(
        nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            x[:, 1:].reshape(-1),
            reduction="sum",
        )
    )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    device: torch.device,
    max_samples: int | None = None,
) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping ``seqlen`` windows of ``ids``.

    Returns (perplexity, tokens scored).
    """
    nll, count = 0.0, 0
    for w in windows(ids, seqlen, max_samples):
        x = w.unsqueeze(0).to(device)
        nll += window_nll(model(input_ids=x, use_cache=False).logits, x)
        count += seqlen - 1
    return math.exp(nll / count), count


def evaluate(
    model_path: str,
    text_path: str,
    seqlen: int,
    device: torch.device,
    dtype: torch.dtype,
    max_samples: int | None,
    trust_remote_code: bool = False,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not Path(text_path).is_file():
        raise ValueError(f"evaluation text {text_path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    quantized = path.is_dir() and is_gptq_checkpoint(path)
    if quantized:
        from gptq_worker.format.validate import validate_checkpoint
        from gptq_worker.serve.model import load_quantized_model

        report = validate_checkpoint(path)
        if report.errors:
            raise ValueError(
                f"the checkpoint failed validation: {report.errors[0]}; run "
                f"'gptq-worker validate {path}' for the full report"
            )

        model = load_quantized_model(
            path, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code
        )
    else:
        model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, trust_remote_code=trust_remote_code
            )
            .to(device)
            .eval()
        )
    ids = text_ids(text_path, tokenizer)
    ppl, tokens = perplexity(model, ids, seqlen, device, max_samples)
    return {
        "model": model_path,
        "quantized": quantized,
        "perplexity": round(ppl, 4),
        "tokens": tokens,
        "seqlen": seqlen,
    }
