"""Tiny models built from transformers configs, a tokenizer trained offline, calibration text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig
from gptq_worker.demo.models import stdlib_text, tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def corpus() -> str:
    return stdlib_text(300_000)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(corpus)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """``model_dir("llama", layers=2, ...)`` saves a tiny model (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **kwargs) -> Path:
        key = (model_type, repr(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type)
            model = tiny_model(model_type, len(tokenizer), **kwargs)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


def worker_config(
    model: Path,
    output: Path,
    calibration: Path,
    nsamples: int = 8,
    seqlen: int = 64,
    **quantization,
) -> WorkerConfig:
    return WorkerConfig(
        model=str(model),
        output=str(output),
        quantization=QuantizeConfig(**quantization),
        calibration=CalibrationConfig(dataset=str(calibration), nsamples=nsamples, seqlen=seqlen),
        device="cpu",
    )


def sample_ids(vocab: int, batch: int = 2, seqlen: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))
