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
    assert "yes vllm/marlin" in out
    assert "no  lmdeploy/turbomind" in out and "group_size 32 (needs one of [128])" in out
    assert "vLLM 0.32.0" in out and "LMDeploy 0.18.0 (from source" in out


@pytest.mark.parametrize("static", [True, False])
def test_act_order_is_written_in_the_form_its_g_idx_has(
    tmp_path, model_dir, calibration_file, capsys, static
):
    """Static act-order leaves g_idx trivial and is written desc_act false, so vLLM 0.32 loads
    it; real act-order keeps desc_act true and only the built-in runtime serves it."""
    out = tmp_path / "act"
    cfg = worker_config(
        model_dir("llama"), out, calibration_file, bits=4, group_size=32, desc_act=True,
        static_groups=static,
    )  # fmt: skip
    quantize(cfg, show_progress=False)
    written = json.loads((out / "quantize_config.json").read_text())
    assert written["desc_act"] is (not static)
    assert written["meta"]["act_order"] == ("static" if static else "groups")
    code, text = _validate(out, capsys)
    assert code == 0, text
    assert ("yes vllm/marlin" in text) is static
    assert "yes builtin/torch" in text
    if not static:
        assert "desc_act true (act-order with groups" in text


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
