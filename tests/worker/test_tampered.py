"""Damaged checkpoints: ``validate`` names the damage and ``serve`` refuses to start.

One good checkpoint is made once; each case copies it, damages it one way, and checks that
``gptq-worker validate`` exits 1 naming the problem and that ``gptq-worker serve`` exits 2
with one line naming it, without ever answering ``/readyz`` with 200.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_worker.cli import main
from gptq_worker.pipeline.run import quantize

from .conftest import worker_config

UP = "model.layers.0.mlp.up_proj"
O_PROJ = "model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory, model_dir, calibration_file) -> Path:
    out = tmp_path_factory.mktemp("tampered") / "good"
    cfg = worker_config(
        model_dir("llama"), out, calibration_file, bits=4, group_size=32, desc_act=False
    )
    quantize(cfg, show_progress=False)
    return out


def _tensors(ckpt: Path, change) -> None:
    shard = ckpt / "model.safetensors"
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _drop(*keys: str):
    def change(t):
        for k in keys:
            del t[k]

    return lambda ckpt: _tensors(ckpt, change)


def _set(key: str, fn):
    def change(t):
        t[key] = fn(t[key]).contiguous()

    return lambda ckpt: _tensors(ckpt, change)


def _config(files=("quantize_config.json", "config.json"), **changes):
    def damage(ckpt: Path) -> None:
        for name in files:
            path = ckpt / name
            data = json.loads(path.read_text())
            target = data if name == "quantize_config.json" else data["quantization_config"]
            target.update(changes)
            path.write_text(json.dumps(data))

    return damage


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t[0, 0] = float("inf")
    return t


def _g_idx_out_of_range(t):
    t = t.clone()
    t[0] = 99
    return t


def _index(entry: str):
    def damage(ckpt: Path) -> None:
        keys = load_file(str(ckpt / "model.safetensors")).keys()
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, entry)}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


def _index_outside(ckpt: Path) -> None:
    shutil.copy(ckpt / "model.safetensors", ckpt.parent / "x.safetensors")
    _index("../x.safetensors")(ckpt)


def _index_absolute(ckpt: Path) -> None:
    target = ckpt.parent / "abs.safetensors"
    shutil.copy(ckpt / "model.safetensors", target)
    _index(str(target))(ckpt)


def _symlink_outside(ckpt: Path) -> None:
    target = ckpt.parent / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", target)
    os.symlink(target, ckpt / "model.safetensors")


def _truncate(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])


def _write(name: str, text: str):
    return lambda ckpt: (ckpt / name).write_text(text)


def _qc_only_bits_8(ckpt: Path) -> None:
    _config(files=("quantize_config.json",), bits=8)(ckpt)


def _extra(ckpt: Path) -> None:
    _tensors(ckpt, lambda t: t.update({"model.extra.weight": torch.ones(4)}))


def _no_quantize_config(ckpt: Path) -> None:
    (ckpt / "quantize_config.json").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))


# (id, damage, what validate says, what serve says when it differs from validate)
CASES = [
    ("missing-module", _drop(*(f"{UP}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))),
     f"tensors the model needs are not in any shard: {UP} (qweight"),
    ("missing-qzeros", _drop(f"{UP}.qzeros"), f"{UP}: missing qzeros"),
    ("missing-dense", _drop("model.norm.weight"), "not in any shard: model.norm.weight"),
    ("extra-tensor", _extra, "tensors the model does not have: model.extra.weight"),
    ("wrong-dtype-scales", _set(f"{UP}.scales", lambda t: t.float()),
     f"{UP}.scales: dtype torch.float32, expected torch.float16"),
    ("wrong-dtype-dense", _set("model.embed_tokens.weight", lambda t: t.to(torch.int32)),
     "model.embed_tokens.weight: dtype torch.int32, expected a floating point tensor"),
    ("wrong-shape-qweight", _set(f"{UP}.qweight", lambda t: t[:-2]),
     f"{UP}.qweight: shape [14, 256], expected [16, 256]"),
    ("wrong-shape-dense", _set("model.norm.weight", lambda t: t[:-1]),
     "model.norm.weight: shape [127], but config.json's model needs [128]"),
    ("nan-scales", _set(f"{O_PROJ}.scales", _nan), f"{O_PROJ}.scales: contains NaN or Inf"),
    ("inf-dense", _set("lm_head.weight", _inf), "lm_head.weight: contains NaN or Inf"),
    ("v2-config-over-v1-zeros", _config(checkpoint_format="gptq_v2"),
     "stored the gptq way, but the config says checkpoint_format gptq_v2"),
    ("bits-mismatch", _config(bits=8), "(the tensor looks 4-bit)"),
    ("group-size-mismatch", _config(group_size=64), "(the tensors look like group_size 32)"),
    ("g-idx-out-of-range", _set(f"{UP}.g_idx", _g_idx_out_of_range),
     f"{UP}.g_idx: values outside [0, 4)"),
    ("index-points-outside", _index_outside,
     "entry '../x.safetensors' is not a file name in the checkpoint directory"),
    ("index-absolute-path", _index_absolute, "the index must list files in the directory"),
    ("symlinked-shard-outside", _symlink_outside, "outside the checkpoint directory"),
    ("truncated-shard", _truncate, "model.safetensors cannot be read (truncated or corrupt?)"),
    ("config-json-unparsable", _write("config.json", "{not json"),
     "config.json cannot be read as JSON"),
    ("config-json-a-list", _write("config.json", "[1, 2]"), "config.json must hold a JSON object"),
    ("quantize-config-a-list", _write("quantize_config.json", "[]"),
     "quantize_config.json must hold a JSON object"),
    ("config-json-missing", lambda c: (c / "config.json").unlink(), "config.json is missing"),
    ("quantize-config-disagrees", _qc_only_bits_8,
     "quantize_config.json says bits=8 but config.json says 4"),
    ("no-quantize-config", _no_quantize_config, "no quantize_config.json or quantization_config"),
    ("dynamic-skips-packed-module", _config(dynamic={"-:.*up_proj": {}}),
     f"{UP}: packed, but 'dynamic' marks it as not quantized"),
    ("lm-head-claimed", _config(lm_head=True), "lm_head: stored dense, but the quantize"),
    ("bad-bits-value", _config(bits=5), "quantization settings are invalid"),
]  # fmt: skip


@pytest.fixture
def damaged(good, tmp_path, request):
    damage = request.param
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good, ckpt)
    damage(ckpt)
    return ckpt


def test_good_checkpoint_validates_and_serves_ready(good, capsys):
    assert main(["validate", str(good)]) == 0, capsys.readouterr().out
    _, lines, ready = _serve(good, stop_when_ready=True)
    assert ready, "".join(lines)


@pytest.mark.parametrize(
    ("damaged", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES], indirect=["damaged"]
)
def test_validate_names_the_damage_and_serve_refuses(damaged, says, capsys):
    code = main(["validate", str(damaged)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert says in out, out
    code, lines, ready = _serve(damaged)
    text = "".join(lines)
    assert code == 2, text
    assert not ready, text
    assert "Traceback" not in text
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and str(damaged) in errors[0], text
    if (damaged / "config.json").exists():  # else serve stops at "no config.json" first
        assert says in errors[0], text
    assert "ready:" not in text


def _serve(ckpt: Path, stop_when_ready: bool = False, timeout: float = 90):
    """Run ``gptq-worker serve``; poll /readyz until it exits. (exit code, lines, ever ready)"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptq_worker.cli", "serve", str(ckpt), "--port", "0",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    ready, port = False, None
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if port is None:
                for line in list(lines):
                    if m := re.search(r"listening on http://[^:]+:(\d+)", line):
                        port = int(m.group(1))
            if port is not None and _readyz(port) == 200:
                ready = True
                if stop_when_ready:
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.terminate()
        code = proc.wait(60)
        reader.join(5)
    return code, lines, ready


def _readyz(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None
