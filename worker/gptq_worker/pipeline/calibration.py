"""Calibration data: local text/JSONL/Parquet files or a Hugging Face dataset, as token windows.

Every document is tokenized and the documents are joined (EOS between them) into one
token stream, which is cut into non-overlapping windows of exactly ``seqlen`` tokens;
``nsamples`` windows are drawn with ``seed``. No sample is padded, so no mask is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")


class CalibrationError(ValueError):
    pass


Document = str | list[int]  # text, or pre-tokenized ids


def read_documents(source: str, role: str = "calibration") -> list[Document]:
    """Documents from a file, a directory of files, or a Hugging Face dataset name.

    ``role`` names the data in errors (calibration, evaluation)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(f"{role} directory {path} has no {'/'.join(SUFFIXES)} files")
        return [doc for f in files for doc in _read_file(f, role)]
    if path.is_file():
        return _read_file(path, role)
    if path.suffix in SUFFIXES or source.startswith((".", "/", "~")):
        raise CalibrationError(f"{role} file {source} does not exist")
    return _read_hub_dataset(source, role)


def _read_file(path: Path, role: str = "calibration") -> list[Document]:
    try:
        return _read_file_unchecked(path, role)
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{role} file {path} is not valid UTF-8 (byte {err.start}); convert it to UTF-8"
        ) from err
    except OSError as err:
        raise CalibrationError(
            f"{role} file {path} cannot be read: {err.strerror or err}; check its "
            "permissions and format"
        ) from err
    except CalibrationError:
        raise
    except Exception as err:  # pyarrow raises its own types for a file that is not parquet
        raise CalibrationError(
            f"{role} file {path} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check its format"
        ) from err


def _read_file_unchecked(path: Path, role: str) -> list[Document]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    if path.suffix == ".jsonl":
        docs: list[Document] = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(_row(json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as err:
                    raise CalibrationError(f"{path}:{lineno} is not valid JSON: {err}") from err
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [_row(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]
    raise CalibrationError(f"{role} file {path} must end in {', '.join(SUFFIXES)}")


def _row(row: object, where: str) -> Document:
    if isinstance(row, dict):
        if isinstance(row.get("input_ids"), list):
            return [int(t) for t in row["input_ids"]]
        if isinstance(row.get("text"), str):
            return row["text"]
    raise CalibrationError(f"{where}: each row needs a 'text' string or an 'input_ids' list")


def _read_hub_dataset(name: str, role: str = "calibration") -> list[Document]:
    """``org/name[:config]``, split ``train``, column ``text``; needs the network."""
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError(
            f"{name!r} is not a local file, and loading it as a Hugging Face dataset needs the "
            "'datasets' package (pip install datasets)"
        ) from err
    repo, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        return [row["text"] for _, row in zip(range(20_000), stream, strict=False)]
    except Exception as err:  # the hub client raises many types; report any of them plainly
        raise CalibrationError(
            f"could not load {role} dataset {name!r} from the Hugging Face hub: {err}. "
            "Without network access, pass a local .txt/.jsonl/.parquet file or directory"
        ) from err


def token_stream(documents: list[Document], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        ids = doc if isinstance(doc, list) else tokenizer(doc, add_special_tokens=False).input_ids
        stream.extend(ids)
        if eos is not None and ids:
            stream.append(eos)
    return stream


def calibration_samples(
    source: str, tokenizer, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``[n, seqlen]`` int64 token windows, ``n = min(nsamples, windows available)``."""
    stream = token_stream(read_documents(source), tokenizer)
    if not stream:
        raise CalibrationError(f"calibration data {source} contains no text")
    windows = len(stream) // seqlen
    if windows == 0:
        raise CalibrationError(
            f"calibration data {source} has {len(stream)} tokens, fewer than one sample of "
            f"seqlen {seqlen}; pass more data or --seqlen {max(8, len(stream))} or less"
        )
    if windows < nsamples:
        log.warning(
            "calibration data gives %d samples of %d tokens, fewer than nsamples=%d",
            windows,
            seqlen,
            nsamples,
        )
    ids = torch.tensor(stream[: windows * seqlen], dtype=torch.int64).view(windows, seqlen)
    pick = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:nsamples]
    return ids[pick]


def batches(samples: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    yield from samples.split(batch_size)


def fingerprint(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16]
