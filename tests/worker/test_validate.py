"""``gptq-worker validate`` catches planted mismatches between config and tensors."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from gptq_worker.cli import main
from gptq_worker.pipeline.run import quantize

from .conftest import worker_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_dir, calibration_file):
    """Two good checkpoints: 4-bit g32 v1 and 4-bit g32 v2 (both symmetric)."""
    root = tmp_path_factory.mktemp("validate")
    made = {}
    for fmt in ("gptq", "gptq_v2"):
        out = root / fmt
        quantize(
            worker_config(
                model_dir("llama"),
                out,
                calibration_file,
                bits=4,
                group_size=32,
                desc_act=False,  # the g_idx checks below assume column-order groups
                checkpoint_format=fmt,
            ),
            show_progress=False,
        )
        made[fmt] = out
    return made


@pytest.fixture
def copy_of(checkpoints, tmp_path):
    def make(fmt: str = "gptq"):
        dst = tmp_path / fmt
        shutil.copytree(checkpoints[fmt], dst)
        return dst

    return make


def _set_config(directory, **changes):
    for name in ("quantize_config.json", "config.json"):
        path = directory / name
        data = json.loads(path.read_text())
        target = data if name == "quantize_config.json" else data["quantization_config"]
        target.update(changes)
        path.write_text(json.dumps(data))


def _validate(directory, capsys):
    code = main(["validate", str(directory)])
    return code, capsys.readouterr().out


def test_good_checkpoint_passes_and_lists_kernels(copy_of, capsys):
    code, out = _validate(copy_of(), capsys)
    assert code == 0, out
    assert "OK" in out
    assert "yes vllm/gptq_marlin" in out
    assert "no  lmdeploy/turbomind" in out and "group_size 32 (needs 128)" in out


def test_config_group_size_differs_from_tensors(copy_of, capsys):
    ckpt = copy_of()
    _set_config(ckpt, group_size=64)  # tensors are g32
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert "group_size 64 over in_features 128 gives 2" in out
    assert "look like group_size 32" in out


def test_truncated_tensor_file(copy_of, capsys):
    ckpt = copy_of()
    shard = ckpt / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert "cannot be read" in out


def test_truncated_tensor_shape(copy_of, capsys):
    ckpt = copy_of()
    shard = ckpt / "model.safetensors"
    tensors = load_file(str(shard))
    key = "model.layers.0.mlp.up_proj.qweight"
    tensors[key] = tensors[key][:-2].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert f"{key}: shape [14, 256], expected [16, 256]" in out


def test_v2_zeros_labelled_v1(copy_of, capsys):
    ckpt = copy_of("gptq_v2")
    _set_config(ckpt, checkpoint_format="gptq")
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert "stored the gptq_v2 way, but the config says checkpoint_format gptq" in out


def test_quantize_config_disagrees_with_config_json(copy_of, capsys):
    ckpt = copy_of()
    qc = json.loads((ckpt / "quantize_config.json").read_text())
    qc["bits"] = 8
    (ckpt / "quantize_config.json").write_text(json.dumps(qc))
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert "quantize_config.json says bits=8 but config.json says 4" in out
    assert "looks 4-bit" in out


def test_act_order_g_idx_without_desc_act_and_nan_scales(copy_of, capsys):
    ckpt = copy_of()
    shard = ckpt / "model.safetensors"
    tensors = load_file(str(shard))
    g_idx = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[g_idx] = tensors[g_idx].flip(0).contiguous()
    scales = "model.layers.1.self_attn.o_proj.scales"
    tensors[scales][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert f"{g_idx}: not j // 32, yet desc_act is false" in out
    assert f"{scales}: contains NaN or Inf" in out


def test_missing_shard_listed_in_index(copy_of, tmp_path, capsys):
    ckpt = copy_of()
    tensors = load_file(str(ckpt / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    (ckpt / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in keys[:half]}, str(ckpt / "model-00001-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            k: (
                "model-00001-of-00002.safetensors"
                if i < half
                else "model-00002-of-00002.safetensors"
            )
            for i, k in enumerate(keys)
        },
    }
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out = _validate(ckpt, capsys)
    assert code == 1
    assert "model-00002-of-00002.safetensors is listed in the index but missing" in out


def test_json_report(copy_of, capsys):
    code = main(["validate", str(copy_of()), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] is True
    assert report["kernels"]["vllm/machete"]["loads"] is False
    assert report["kernels"]["builtin/torch"]["loads"] is True
    assert report["modules"] == 14
