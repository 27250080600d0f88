"""End to end on tiny random models (tier 2): quantize -> save -> reload -> same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gptq_worker.format.checkpoint import load_tensors, write_checkpoint
from gptq_worker.format.validate import validate_checkpoint
from gptq_worker.pipeline.run import load_model, quantize, quantize_model
from gptq_worker.serve.model import load_quantized_model

from .conftest import sample_ids, worker_config


def assert_reload_matches(out, model, tokenizer) -> None:
    """The checkpoint at ``out``, read back, gives the in-memory model's logits."""
    ids = sample_ids(len(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(
            load_quantized_model(out)(input_ids=ids).logits,
            model(input_ids=ids).logits,
            rtol=1e-4,
            atol=1e-4,
        )


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "gpt2"]


def _fake_quantized(model_dir, tmp_path, calibration, **quantization):
    """The model as the engine leaves it in memory, with its packed tensors."""
    cfg = worker_config(model_dir, tmp_path / "unused", calibration, **quantization)
    model, tokenizer = load_model(str(model_dir), torch.float32, False)
    packed, progress, _ = quantize_model(
        model, tokenizer, cfg, torch.device("cpu"), tmp_path / "work", show_progress=False
    )
    progress.close()
    return model, tokenizer, packed, cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_reloaded_checkpoint_matches_fake_quantized_model(
    arch, model_dir, tmp_path, calibration_file
):
    src = model_dir(arch)
    model, tokenizer, packed, cfg = _fake_quantized(
        src, tmp_path, calibration_file, bits=4, group_size=32
    )
    out = tmp_path / "ckpt"
    write_checkpoint(out, model, tokenizer, packed, cfg.quantization)
    assert validate_checkpoint(out).errors == []

    reloaded = load_quantized_model(out)
    ids = sample_ids(len(tokenizer))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and quantization really changed the model
    original = load_model(str(src), torch.float32, False)[0]
    with torch.no_grad():
        assert not torch.allclose(original(input_ids=ids).logits, expected, atol=1e-3)


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 3, "group_size": 32, "sym": False, "desc_act": True},
        {"bits": 2, "group_size": -1, "sym": True, "true_sequential": False},
        {"bits": 8, "group_size": 64, "desc_act": True, "static_groups": True, "mse": 2.4},
        {"bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2", "sym": False},
    ],
    ids=["3bit-asym-actorder", "2bit-perchannel-nontrueseq", "8bit-static-mse", "4bit-v2"],
)
def test_settings_round_trip(settings, model_dir, tmp_path, calibration_file):
    model, tokenizer, packed, cfg = _fake_quantized(
        model_dir("llama"), tmp_path, calibration_file, **settings
    )
    out = tmp_path / "ckpt"
    write_checkpoint(out, model, tokenizer, packed, cfg.quantization)
    report = validate_checkpoint(out)
    assert report.errors == []
    assert_reload_matches(out, model, tokenizer)


def test_dynamic_overrides_and_skips(model_dir, tmp_path, calibration_file):
    dynamic = {
        r"-:.*\.1\.mlp\.down_proj": {},
        r"+:.*\.(q_proj|k_proj|v_proj|qkv_proj)": {"bits": 8, "group_size": 64},
    }
    model, tokenizer, packed, cfg = _fake_quantized(
        model_dir("llama"), tmp_path, calibration_file, bits=4, group_size=32, dynamic=dynamic
    )
    assert "model.layers.1.mlp.down_proj.qweight" not in packed
    assert "model.layers.0.mlp.down_proj.qweight" in packed
    q = packed["model.layers.0.self_attn.q_proj.qweight"]
    assert q.shape[0] == 128 * 8 // 32  # 8-bit rows
    assert packed["model.layers.0.self_attn.q_proj.scales"].shape[0] == 128 // 64
    out = tmp_path / "ckpt"
    write_checkpoint(out, model, tokenizer, packed, cfg.quantization)
    assert validate_checkpoint(out).errors == []
    tensors = load_tensors(out)
    assert "model.layers.1.mlp.down_proj.weight" in tensors  # kept in fp16
    assert_reload_matches(out, model, tokenizer)


def test_lm_head_quantization_unties_embeddings(model_dir, tmp_path, calibration_file):
    src = model_dir("llama", tie_word_embeddings=True)
    model, tokenizer, packed, cfg = _fake_quantized(src, tmp_path, calibration_file, lm_head=True)
    assert "lm_head.qweight" in packed
    out = tmp_path / "ckpt"
    write_checkpoint(out, model, tokenizer, packed, cfg.quantization)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["lm_head"] is True
    assert_reload_matches(out, model, tokenizer)


def test_cli_run_writes_complete_sharded_checkpoint(model_dir, tmp_path, calibration_file):
    out = tmp_path / "out"
    progress = tmp_path / "progress.jsonl"
    cfg = worker_config(model_dir("llama"), out, calibration_file).model_copy(
        update={"max_shard_size": "100KB", "progress_file": str(progress)}
    )
    quantize(cfg, show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for required in (
        "config.json",
        "quantize_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert required in names
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq" and qc["quant_method"] == "gptq"
    assert qc["meta"]["quantizer"][0].startswith("gptq-operator:")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qc
    # sym 4-bit v1: every qzeros word is 0x77777777
    qzeros = load_file(str(out / shards[0]))
    for key, t in qzeros.items():
        if key.endswith(".qzeros"):
            assert torch.all(t == 0x77777777)
    # the work directory is gone, and progress events tell the whole story
    assert not (tmp_path / ".out.gptq-work").exists()
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "layer", "layer", "done"]
    assert events[1]["layer"] == 1 and events[1]["layers"] == 2
    assert "model.layers.0.self_attn.q_proj" in events[1]["modules"]
    assert "vllm/marlin" in events[-1]["kernels"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_replaying_captured_inputs_reproduces_hidden_states(arch, model_dir, tokenizer):
    """Each layer must get its own keyword arguments: in Gemma 3, sliding-window and full
    attention layers receive different masks and rotary tables."""
    from gptq_worker.arch import architecture_for
    from gptq_worker.pipeline.capture import capture_inputs, forward_layer

    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    kwargs = {"layers": 3}
    if arch == "gemma3_text":
        kwargs["layer_types"] = layer_types
    src = model_dir(arch, **kwargs)
    model, _ = load_model(str(src), torch.float32, False)
    ids = sample_ids(len(tokenizer), seqlen=64)
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    arch_entry = architecture_for(model)
    acts = capture_inputs(model, arch_entry, [ids], torch.device("cpu"))
    layers = model.get_submodule(arch_entry.layers)
    for i in range(len(layers) - 1):  # the last entry of hidden_states has the final norm
        acts.hidden = forward_layer(layers[i], acts, i)
        torch.testing.assert_close(acts.hidden[0], reference[i + 1], rtol=1e-5, atol=1e-5)


def test_perplexity_measured_in_the_pass_equals_eval(model_dir, tmp_path, calibration_file):
    """Before/after perplexity from the layer-by-layer pass equals `gptq-worker eval` of the
    source model and of the written checkpoint on the same windows."""
    from gptq_compat.config import EvaluationConfig
    from gptq_worker.eval.perplexity import evaluate

    src, out = model_dir("llama"), tmp_path / "ckpt"
    cfg = worker_config(src, out, calibration_file, bits=3, group_size=32).model_copy(
        update={
            "evaluation": EvaluationConfig(text=str(calibration_file), seqlen=64, max_samples=4)
        }
    )
    quantize(cfg, show_progress=False)
    measured = json.loads((out / "quantize_config.json").read_text())["meta"]["perplexity"]
    cpu = torch.device("cpu")
    before = evaluate(str(src), str(calibration_file), 64, cpu, torch.float32, 4)
    after = evaluate(str(out), str(calibration_file), 64, cpu, torch.float32, 4)
    assert measured["before"] == pytest.approx(before["perplexity"], rel=1e-4)
    assert measured["after"] == pytest.approx(after["perplexity"], rel=1e-4)
    assert measured["after"] != measured["before"]


def test_termination_message_carries_the_result(model_dir, tmp_path, calibration_file):
    from gptq_worker.cli import main

    message = tmp_path / "termination-log"
    args = [
        "quantize",
        "--no-progress-bar",
        "--model",
        str(model_dir("llama")),
        "--output",
        str(tmp_path / "out"),
        "--calibration",
        str(calibration_file),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--eval-text",
        str(calibration_file),
        "--eval-samples",
        "2",
        "--termination-message",
        str(message),
    ]
    assert main(args) == 0
    result = json.loads(message.read_text())
    shapes = result["format"].pop("shapes")
    assert result["format"] == {
        "bits": 4,
        "groupSize": 128,
        "descAct": False,  # the default, static act-order, is written as desc_act false
        "sym": True,
        "checkpointFormat": "gptq",
    }
    assert {"name": "down_proj", "inFeatures": 256, "outFeatures": 128} in shapes
    assert "vllm/marlin" in result["kernels"] and result["checkpointBytes"] > 0
    assert result["perplexityAfter"] > 0 and result["perplexityBefore"] > 0
    bad = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in args]
    assert main([*bad, "--group-size", "48"]) == 2
    assert "not a multiple of group_size 48" in json.loads(message.read_text())["error"]


def test_the_command_leaves_at_once_with_everything_said(model_dir, tmp_path, calibration_file):
    """``python -m gptq_worker.cli quantize`` leaves the process without the interpreter's
    teardown (cli.entry): what it printed to pipes, logged and wrote is all there, and a
    failed run still says why and exits 2."""
    import subprocess
    import sys

    message, progress = tmp_path / "termination-log", tmp_path / "progress.jsonl"
    args = [
        sys.executable, "-m", "gptq_worker.cli", "-v", "quantize", "--no-progress-bar",
        "--model", str(model_dir("llama")), "--output", str(tmp_path / "out"),
        "--calibration", str(calibration_file), "--nsamples", "4", "--seqlen", "64",
        "--device", "cpu", "--termination-message", str(message),
        "--progress-file", str(progress),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"wrote {tmp_path / 'out'}")  # a pipe: block-buffered
    assert "published, work directory removed" in done.stderr.splitlines()[-1]
    assert json.loads(message.read_text())["kernels"]
    assert json.loads(progress.read_text().splitlines()[-1])["event"] == "done"
    failed = subprocess.run(
        [*args[:-4], "--output", str(tmp_path / "out2"), "--group-size", "48"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert failed.returncode == 2 and "not a multiple of group_size 48" in failed.stderr


def test_evaluation_reads_what_calibration_reads(model_dir, tmp_path, corpus):
    """A quality gate without evalDataset scores the calibration dataset: the worker reads
    it as calibration does (here JSONL rows), not as a plain text file; a missing one is one
    clear error naming the evaluation data."""
    from gptq_compat.config import EvaluationConfig
    from gptq_worker.pipeline.calibration import CalibrationError

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"text": corpus[i : i + 4000]}) for i in range(0, 80_000, 4000))
    )
    src, out = model_dir("llama"), tmp_path / "ckpt"
    cfg = worker_config(src, out, rows, bits=4, group_size=32).model_copy(
        update={"evaluation": EvaluationConfig(text=str(rows), seqlen=64, max_samples=4)}
    )
    quantize(cfg, show_progress=False)
    measured = json.loads((out / "quantize_config.json").read_text())["meta"]["perplexity"]
    # the same number as scoring the documents' token stream (not the raw JSON lines)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_worker.eval.perplexity import perplexity
    from gptq_worker.pipeline.calibration import read_documents, token_stream

    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(token_stream(read_documents(str(rows)), tok))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    before, _ = perplexity(model, ids, 64, torch.device("cpu"), 4)
    assert measured["before"] == pytest.approx(before, rel=1e-4)
    missing = cfg.model_copy(
        update={
            "output": str(tmp_path / "other"),
            "evaluation": EvaluationConfig(text=str(tmp_path / "held-out.jsonl")),
        }
    )
    with pytest.raises(CalibrationError, match=r"evaluation file .*held-out.jsonl does not exist"):
        quantize(missing, show_progress=False)


def test_checkpoint_is_readable_by_every_user_whatever_the_umask(
    model_dir, tmp_path, calibration_file
):
    """A serving pod runs as another user than the worker: the published checkpoint is
    files 0644 and directories 0755 even when the worker's umask is 077."""
    import os
    import stat

    out = tmp_path / "ckpt"
    old = os.umask(0o077)
    try:
        quantize(worker_config(model_dir("llama"), out, calibration_file), show_progress=False)
    finally:
        os.umask(old)
    modes = {
        p.relative_to(out).as_posix() or ".": stat.S_IMODE(p.stat().st_mode)
        for p in [out, *out.rglob("*")]
    }
    assert modes["."] == 0o755
    assert modes and all(m == (0o755 if (out / p).is_dir() else 0o644) for p, m in modes.items()), (
        modes
    )
