"""Bad input gets a clear message and exit code 2, and nothing that looks like a checkpoint."""

from __future__ import annotations

import json

import pytest
import transformers

from gptq_worker.cli import main


@pytest.fixture
def run(capsys):
    def invoke(*args: str) -> tuple[int, str]:
        code = main(["quantize", "--no-progress-bar", *args])
        captured = capsys.readouterr()
        return code, captured.err + captured.out

    return invoke


def _base(model, out, calib):
    return [
        "--model",
        str(model),
        "--output",
        str(out),
        "--calibration",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--device",
        "cpu",
    ]


def test_missing_model(run, tmp_path, calibration_file):
    code, err = run(*_base(tmp_path / "nope", tmp_path / "out", calibration_file))
    assert code == 2
    assert "model" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_model_directory_without_config(run, tmp_path, calibration_file):
    (tmp_path / "empty").mkdir()
    code, err = run(*_base(tmp_path / "empty", tmp_path / "out", calibration_file))
    assert code == 2 and "has no config.json" in err


def test_unsupported_architecture(run, tmp_path, tokenizer, calibration_file):
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        ffn_dim=128,
        num_attention_heads=2,
        word_embed_proj_dim=64,
    )
    model_path = tmp_path / "opt"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    code, err = run(*_base(model_path, tmp_path / "out", calibration_file))
    assert code == 2
    assert "model_type 'opt' is not supported" in err and "llama" in err
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide(run, tmp_path, model_dir, calibration_file):
    code, err = run(
        *_base(model_dir("llama"), tmp_path / "out", calibration_file), "--group-size", "48"
    )
    assert code == 2
    assert "in_features 128 is not a multiple of group_size 48; use group_size 128 or -1" in err


def test_empty_calibration_file(run, tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run(*_base(model_dir("llama"), tmp_path / "out", empty))
    assert code == 2 and "contains no text" in err
    assert not (tmp_path / "out").exists()


def test_calibration_too_short_for_seqlen(run, tmp_path, model_dir):
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n")
    code, err = run(*_base(model_dir("llama"), tmp_path / "out", short))
    assert code == 2 and "fewer than one sample of seqlen 64" in err


def test_unwritable_output(run, tmp_path, model_dir, calibration_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = run(*_base(model_dir("llama"), blocker / "out", calibration_file))
    assert code == 2 and "is not writable" in err


def test_existing_output_needs_overwrite(run, tmp_path, model_dir, calibration_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run(*_base(model_dir("llama"), out, calibration_file))
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_invalid_settings_are_named(run, tmp_path, model_dir, calibration_file):
    code, err = run(
        *_base(model_dir("llama"), tmp_path / "out", calibration_file), "--damp-percent", "1.5"
    )
    assert code == 2 and "quantization.damp_percent" in err
    code, err = run(
        *_base(model_dir("llama"), tmp_path / "out", calibration_file),
        "--dynamic",
        '{"+:q_proj": {"bitz": 3}}',
    )
    assert code == 2 and "overridable keys are" in err
    code, err = run(
        *_base(model_dir("llama"), tmp_path / "out", calibration_file), "--dynamic", "{not json"
    )
    assert code == 2 and "--dynamic is not valid JSON" in err


def test_config_file_with_cli_overrides(run, tmp_path, model_dir, calibration_file, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {model_dir('llama')}\n"
        f"output: {tmp_path / 'out'}\n"
        "device: cpu\n"
        "quantization:\n  bits: 3\n  groupSize: 64\n  descAct: true\n  staticGroups: false\n"
        f"calibration:\n  dataset: {calibration_file}\n  nsamples: 4\n  seqlen: 64\n"
    )
    code, out = run("--config", str(config), "--bits", "4")
    assert code == 0, out
    qc = json.loads((tmp_path / "out" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"]) == (4, 64, True)
    assert main(["validate", str(tmp_path / "out")]) == 0
    capsys.readouterr()


def test_eval_reports_perplexity_for_model_and_checkpoint(
    tmp_path, model_dir, calibration_file, capsys
):
    src = model_dir("llama")
    out = tmp_path / "out"
    assert main(["quantize", "--no-progress-bar", *_base(src, out, calibration_file)]) == 0
    capsys.readouterr()
    results = []
    for target in (src, out):
        assert (
            main(
                [
                    "eval",
                    str(target),
                    "--text",
                    str(calibration_file),
                    "--seqlen",
                    "64",
                    "--max-samples",
                    "4",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["quantized"] is False and results[1]["quantized"] is True
    assert results[0]["tokens"] == results[1]["tokens"] == 4 * 63
    assert results[0]["perplexity"] != results[1]["perplexity"]
    assert main(["eval", str(src), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_setting_has_a_flag_that_reaches_the_config():
    """Flags are made from the settings models: a field added there gets a flag, and each
    flag sets its own field (checked by giving a non-default value for every one)."""
    import argparse

    from gptq_compat.config import WorkerConfig
    from gptq_worker.cli import parser
    from gptq_worker.cli.flags import SECTIONS, setting_flags, worker_config

    flags = setting_flags()
    fields = {
        (section, name)
        for section, model, _ in SECTIONS
        for name in model.model_fields
        if not (section == "" and name in ("quantization", "calibration", "evaluation"))
    }
    assert set(flags.values()) == fields
    assert "--revision" in flags and "--format" in flags and "--calibration" in flags

    values = {
        "--bits": "3",
        "--group-size": "64",
        "--damp-percent": "0.05",
        "--damp-auto-increment": "0.01",
        "--mse": "2.4",
        "--gptaq-alpha": "0.5",
        "--method": "rtn",
        "--format": "gptq_v2",
        "--dynamic": '{"-:.*down_proj": {}}',
        "--calibration": "calib.txt",
        "--profile": "code",
        "--nsamples": "7",
        "--seqlen": "99",
        "--seed": "5",
        "--eval-text": "held-out.txt",
        "--eval-seqlen": "77",
        "--eval-samples": "3",
        "--model": "m",
        "--revision": "v2",
        "--output": "o",
        "--device": "cpu",
        "--dtype": "bfloat16",
        "--batch-size": "2",
        "--hessian-precision": "fp32",
        "--max-shard-size": "1GB",
        "--progress-file": "p.jsonl",
    }
    argv = ["quantize"]
    for flag, (section, name) in flags.items():
        if flag in values:
            argv += [flag, values[flag]]
        else:  # booleans: the opposite of the default
            model = dict((s, m) for s, m, _ in SECTIONS)[section]
            default = model.model_fields[name].default
            assert isinstance(default, bool), f"{flag} needs a test value"
            argv.append(flag if not default else "--no-" + flag.removeprefix("--"))
    args = parser().parse_args(argv)
    cfg = worker_config(args)
    assert isinstance(args, argparse.Namespace) and isinstance(cfg, WorkerConfig)
    default = WorkerConfig(model="x", output="y", evaluation={"text": "t"})
    for flag, (section, name) in flags.items():
        got = getattr(getattr(cfg, section) if section else cfg, name)
        was = getattr(getattr(default, section) if section else default, name)
        assert got != was, f"{flag} did not change {section or 'top'}.{name}"
