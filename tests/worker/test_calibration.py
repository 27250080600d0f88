"""Calibration sources: .txt, .jsonl (text or input_ids), .parquet, directories."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptq_worker.pipeline.calibration import CalibrationError, calibration_samples, read_documents


def test_every_source_gives_full_windows(tmp_path, tokenizer, corpus):
    docs = [corpus[i : i + 5000] for i in range(0, 60_000, 5000)]
    (tmp_path / "a.txt").write_text("".join(docs[:4]))
    with (tmp_path / "b.jsonl").open("w") as fh:
        for d in docs[4:8]:
            fh.write(json.dumps({"text": d}) + "\n")
        fh.write(json.dumps({"input_ids": list(range(3, 300))}) + "\n")
    pq.write_table(pa.table({"text": docs[8:]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x,y\n")

    assert len(read_documents(str(tmp_path))) == 1 + 5 + 4
    samples = calibration_samples(str(tmp_path), tokenizer, nsamples=16, seqlen=128, seed=0)
    assert samples.shape == (16, 128) and samples.dtype == torch.int64
    again = calibration_samples(str(tmp_path), tokenizer, nsamples=16, seqlen=128, seed=0)
    other = calibration_samples(str(tmp_path), tokenizer, nsamples=16, seqlen=128, seed=1)
    assert torch.equal(samples, again) and not torch.equal(samples, other)


def test_pretokenized_rows_are_used_as_is(tmp_path, tokenizer):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"input_ids": list(range(10, 74))}) + "\n")
    samples = calibration_samples(str(path), tokenizer, nsamples=1, seqlen=64, seed=0)
    assert samples[0].tolist() == list(range(10, 74))


def test_fewer_windows_than_nsamples_uses_all(tmp_path, tokenizer, corpus):
    path = tmp_path / "small.txt"
    path.write_text(corpus[:3000])
    samples = calibration_samples(str(path), tokenizer, nsamples=1000, seqlen=64, seed=0)
    assert 1 <= samples.shape[0] < 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": 3}\n', "needs a 'text' string or an 'input_ids' list"),
        ("{oops\n", "is not valid JSON"),
    ],
)
def test_bad_jsonl_rows_are_named(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        calibration_samples(str(path), tokenizer, 1, 16, 0)


def test_missing_file_and_empty_directory(tmp_path, tokenizer):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match=r"has no \.txt/\.jsonl/\.parquet files"):
        read_documents(str(tmp_path))


def test_hub_dataset_without_network_says_what_to_do(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # the offline switches are read at import time, so set the constants themselves
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CalibrationError, match=r"pass a local \.txt/\.jsonl/\.parquet"):
        read_documents("no-such-org/no-such-dataset")
