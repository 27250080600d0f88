"""``gptq-worker validate`` catches planted mismatches between config and tensors."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_worker.cli import main
from gptq_worker.format.tensorfiles import TensorFiles
from gptq_worker.format.validate import all_finite
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_reads_the_bits_like_isfinite(dtype, bad):
    """The bit test agrees with torch.isfinite on every float dtype, for a NaN or an
    infinity of either sign in any piece (the last, partial one included), and passes
    the largest finite values and negative zero."""
    info = torch.finfo(dtype)
    t = torch.randn(1000, dtype=torch.float32).to(dtype)
    t[:4] = torch.tensor([info.max, -info.max, -0.0, info.tiny], dtype=dtype)
    assert all_finite(t, chunk=64) and all_finite(t[::3], chunk=64)  # strided: a copy
    assert all_finite(t[:0])
    if bad is None:
        return
    for at in (0, 63, 64, 999):
        u = t.clone()
        u[at] = bad
        assert not all_finite(u, chunk=64), at
        assert all_finite(u, chunk=64) == bool(torch.isfinite(u).all())


@pytest.mark.parametrize(
    "dtype",
    [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz],
)
def test_all_finite_on_float8(dtype):
    """Every float8 bit pattern: all_finite agrees with isfinite of its float32 value."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.int8)
    for code in codes:
        t = torch.zeros(5, dtype=torch.int8)
        t[2] = code
        t = t.view(dtype)
        assert all_finite(t) == bool(torch.isfinite(t.float()).all()), (dtype, int(code))


def test_map_chunks_sees_every_byte_in_whole_elements(tmp_path):
    """A tensor read in pieces by several threads: the pieces, put together, are the
    tensor, each a whole number of elements, and a NaN in the last piece is found."""
    t = torch.arange(10_003, dtype=torch.float32)
    t[-1] = float("nan")
    save_file({"a": t, "b": torch.ones(3, dtype=torch.float16)}, tmp_path / "x.safetensors")
    files = TensorFiles([tmp_path / "x.safetensors"])
    with ThreadPoolExecutor(4) as pool:
        pieces = files.map_chunks("a", lambda x: x.clone(), pool, chunk=4098)  # 1024.5 floats
        assert [p.numel() for p in pieces[:-1]] == [1024] * (len(pieces) - 1)
        assert torch.equal(torch.cat(pieces)[:-1], t[:-1]) and torch.cat(pieces)[-1].isnan()
        assert files.map_chunks("a", all_finite, pool, chunk=4096)[:-1] == [True] * 9
        assert not all(files.map_chunks("a", all_finite, pool, chunk=4096))
        assert files.map_chunks("b", all_finite, pool) == [True]
