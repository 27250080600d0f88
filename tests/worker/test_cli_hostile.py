"""Hostile command lines: each is refused with exit 2 and one clear line, never a traceback,
and the source model is left exactly as it was."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from gptq_worker.cli import main
from gptq_worker.pipeline.run import lock_file_for


def _checksum(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def env(tmp_path, model_dir, calibration_file):
    """A private copy of a tiny model and of the calibration text, under ``tmp_path``."""
    model = tmp_path / "model"
    shutil.copytree(model_dir("llama"), model)
    calib = tmp_path / "calib" / "calibration.txt"
    calib.parent.mkdir()
    shutil.copy(calibration_file, calib)
    return {"tmp": tmp_path, "model": model, "calib": calib}


def _quantize_args(
    env, *extra: str, output: str | None = None, model: str | None = None, calib: str | None = None
) -> list[str]:
    args = ["quantize", "--model", model or str(env["model"])]
    args += ["--calibration", calib or str(env["calib"])]
    args += ["--output", output or str(env["tmp"] / "out"), "--device", "cpu"]
    return [*args, "--nsamples", "2", "--seqlen", "16", "--no-progress-bar", *extra]


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


# (id, function of env -> argv, substring the error must contain)
CASES = [
    (
        "model-missing",
        lambda e: _quantize_args(e, model=str(e["tmp"] / "nope")),
        "does not exist",
    ),
    (
        "model-is-a-file",
        lambda e: _quantize_args(e, model=str(e["model"] / "config.json")),
        "has no config.json",
    ),
    (
        "model-without-config",
        lambda e: _quantize_args(e, model=str(e["calib"].parent)),
        "has no config.json",
    ),
    (
        "output-is-model",
        lambda e: _quantize_args(e, "--overwrite", output=str(e["model"])),
        "output must differ from model",
    ),
    (
        "output-inside-model",
        lambda e: _quantize_args(e, "--overwrite", output=str(e["model"] / "out")),
        "overlaps the model",
    ),
    (
        "output-contains-model",
        lambda e: _quantize_args(e, "--overwrite", output=str(e["tmp"])),
        "overlaps the model",
    ),
    (
        "output-via-symlink-to-model",
        lambda e: (
            os.symlink(e["model"], e["tmp"] / "link"),
            _quantize_args(e, "--overwrite", output=str(e["tmp"] / "link" / "sub")),
        )[1],
        "overlaps the model",
    ),
    (
        "output-is-calibration-dir",
        lambda e: _quantize_args(e, "--overwrite", output=str(e["calib"].parent)),
        "overlaps the calibration data",
    ),
    (
        "output-is-a-file",
        lambda e: _quantize_args(e, output=_write(e["tmp"] / "file", "x")),
        "exists and is not a directory",
    ),
    (
        "config-missing",
        lambda e: _quantize_args(e, "--config", str(e["tmp"] / "none.yaml")),
        "cannot read config file",
    ),
    (
        "config-is-a-list",
        lambda e: _quantize_args(e, "--config", _write(e["tmp"] / "c.yaml", "- 1\n- 2\n")),
        "must hold a mapping, not list",
    ),
    (
        "config-is-binary",
        lambda e: _quantize_args(e, "--config", _write(e["tmp"] / "c.bin", b"\xff\xfe\x00\x81")),
        "is not UTF-8 text",
    ),
    (
        "config-bad-yaml",
        lambda e: _quantize_args(e, "--config", _write(e["tmp"] / "c.yaml", "a: [1,\n")),
        "is not valid YAML/JSON",
    ),
    (
        "config-is-a-directory",
        lambda e: _quantize_args(e, "--config", str(e["tmp"])),
        "cannot read config file",
    ),
    (
        "config-unknown-key",
        lambda e: _quantize_args(e, "--config", _write(e["tmp"] / "c.json", '{"bitz": 4}')),
        "bitz: Extra inputs are not permitted",
    ),
    (
        "dynamic-bad-regex",
        lambda e: _quantize_args(e, "--dynamic", '{"(": {}}'),
        "not a valid regex",
    ),
    ("dynamic-not-json", lambda e: _quantize_args(e, "--dynamic", "{bits"), "not valid JSON"),
    ("dynamic-a-list", lambda e: _quantize_args(e, "--dynamic", "[1]"), "dynamic"),
    ("max-shard-size-0", lambda e: _quantize_args(e, "--max-shard-size", "0"), "at least 1 byte"),
    (
        "max-shard-size-words",
        lambda e: _quantize_args(e, "--max-shard-size", "big"),
        "is not a size like",
    ),
    ("nsamples-0", lambda e: _quantize_args(e, "--nsamples", "0"), "nsamples"),
    ("seqlen-1", lambda e: _quantize_args(e, "--seqlen", "1"), "seqlen"),
    ("batch-size-0", lambda e: _quantize_args(e, "--batch-size", "0"), "batch_size"),
    (
        "calibration-invalid-utf8",
        lambda e: _quantize_args(e, calib=_write(e["tmp"] / "bad.txt", b"ok \xff\xfe text")),
        "is not valid UTF-8",
    ),
    (
        "calibration-jsonl-invalid-utf8",
        lambda e: _quantize_args(e, calib=_write(e["tmp"] / "b.jsonl", b'{"text": "\xff"}\n')),
        "is not valid UTF-8",
    ),
    (
        "calibration-parquet-garbage",
        lambda e: _quantize_args(e, calib=_write(e["tmp"] / "bad.parquet", b"not parquet")),
        "check its format",
    ),
    (
        "calibration-missing",
        lambda e: _quantize_args(e, calib=str(e["tmp"] / "none.txt")),
        "does not exist",
    ),
    (
        "calibration-empty-dir",
        lambda e: _quantize_args(e, calib=str((e["tmp"] / "empty").mkdir() or e["tmp"] / "empty")),
        "has no",
    ),
    ("device-cuda-7", lambda e: _quantize_args(e, "--device", "cuda:7"), "cuda:7"),
    ("device-nonsense", lambda e: _quantize_args(e, "--device", "gpu0"), "not a device name"),
    (
        "validate-missing-dir",
        lambda e: ["validate", str(e["tmp"] / "nope")],
        "does not exist; pass a checkpoint directory",
    ),
    (
        "validate-a-file",
        lambda e: ["validate", str(e["model"] / "config.json")],
        "is not a directory",
    ),
    (
        "eval-missing-text",
        lambda e: [
            "eval",
            str(e["model"]),
            "--text",
            str(e["tmp"] / "none.txt"),
            "--device",
            "cpu",
        ],
        "evaluation text",
    ),
    (
        "eval-missing-model",
        lambda e: ["eval", str(e["tmp"] / "nope"), "--text", str(e["calib"]), "--device", "cpu"],
        "cannot evaluate",
    ),
    (
        "eval-seqlen-0",
        lambda e: ["eval", str(e["model"]), "--text", str(e["calib"]), "--seqlen", "0"],
        "--seqlen must be at least 2",
    ),
]


@pytest.mark.parametrize(("argv", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_line(env, capsys, argv, says):
    before = _checksum(env["model"])
    calib_before = _checksum(env["calib"].parent)
    code = main(argv(env))
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    # one error line, and it is the last (transformers may draw a loading bar before it)
    assert lines[-1].startswith("error: ") and says in lines[-1], err
    assert sum("error" in line.lower() for line in lines) == 1, err
    assert _checksum(env["model"]) == before
    assert _checksum(env["calib"].parent) == calib_before


def test_second_run_for_one_output_fails_at_once(env, capsys):
    out = env["tmp"] / "out"
    before = _checksum(env["model"])
    lock = lock_file_for(out)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("4242\n")
        fh.flush()
        code = main(_quantize_args(env))
    err = capsys.readouterr().err
    assert code == 2
    assert f"another gptq-worker run is writing {out} (pid 4242)" in err
    assert "wait for it or choose another --output" in err
    assert not out.exists()
    assert _checksum(env["model"]) == before


def test_invalid_settings_are_one_line(env, capsys):
    code = main(_quantize_args(env, "--nsamples", "0", "--seqlen", "1"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
