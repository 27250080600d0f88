"""A killed run resumes after its last finished layer and writes the same checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from gptq_worker.pipeline.run import quantize, work_dir_for

from .conftest import worker_config


class Crash(Exception):
    pass


def _crash_after(layer: int):
    def on_layer(i: int) -> None:
        if i == layer:
            raise Crash(f"simulated crash after layer {i}")

    return on_layer


def _tensors(directory):
    return load_file(str(directory / "model.safetensors"))


def test_resume_after_crash_gives_identical_checkpoint(tmp_path, model_dir, calibration_file):
    src = model_dir("llama", layers=4)
    settings = {"bits": 4, "group_size": 32, "desc_act": True}
    straight = tmp_path / "straight"
    quantize(worker_config(src, straight, calibration_file, **settings), show_progress=False)

    resumed = tmp_path / "resumed"
    progress = tmp_path / "progress.jsonl"
    cfg = worker_config(src, resumed, calibration_file, **settings).model_copy(
        update={"progress_file": str(progress)}
    )
    with pytest.raises(Crash):
        quantize(cfg, show_progress=False, on_layer=_crash_after(1))
    assert not resumed.exists()  # nothing at the output path looks finished
    state = json.loads((work_dir_for(resumed) / "state" / "state.json").read_text())
    assert state["layers_done"] == 2

    quantize(cfg, show_progress=False)
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    second_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    assert events[second_start]["resumed_from_layer"] == 2
    layer_events = [e for e in events[second_start:] if e["event"] == "layer"]
    assert [e["resumed"] for e in layer_events] == [True, True, False, False]

    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_changed_settings_start_over(tmp_path, model_dir, calibration_file):
    src = model_dir("llama", layers=4)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        quantize(
            worker_config(src, out, calibration_file, bits=4),
            show_progress=False,
            on_layer=_crash_after(0),
        )
    progress = tmp_path / "p.jsonl"
    cfg = worker_config(src, out, calibration_file, bits=8).model_copy(
        update={"progress_file": str(progress)}
    )
    quantize(cfg, show_progress=False)
    start = json.loads(progress.read_text().splitlines()[0])
    assert start["resumed_from_layer"] == 0
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 8


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_run_then_resume(tmp_path, model_dir, calibration_file, sig):
    """The real thing: kill the CLI process once a layer is done, then run it again. SIGTERM
    (a pod being deleted) stops it at once with exit code 143, also where it would be a
    container's PID 1 and have no default action for SIGTERM."""
    src = model_dir("llama", layers=8, hidden=256, intermediate=512)
    out = tmp_path / "out"
    progress = tmp_path / "progress.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "gptq_worker.cli",
        "quantize",
        "--no-progress-bar",
        "--model",
        str(src),
        "--output",
        str(out),
        "--calibration",
        str(calibration_file),
        "--nsamples",
        "32",
        "--seqlen",
        "128",
        "--device",
        "cpu",
        "--progress-file",
        str(progress),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and '"event": "layer"' in progress.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert code == 143, proc.stderr.read().decode()
        assert "terminated (SIGTERM)" in proc.stderr.read().decode()
    assert not out.exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from_layer"] >= 1
    assert events[-1]["event"] == "done"
    # the user is told, in words, where the run picked up
    done_layers = starts[1]["resumed_from_layer"]
    assert f"resuming {out}: {done_layers}/8 layers were finished by an earlier run" in done.stderr


def test_changed_weights_start_over(tmp_path, model_dir, calibration_file):
    import shutil

    from gptq_worker.demo.models import tiny_model

    src = tmp_path / "model"
    shutil.copytree(model_dir("llama", layers=4), src)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        quantize(
            worker_config(src, out, calibration_file), show_progress=False, on_layer=_crash_after(1)
        )
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tiny_model("llama", vocab, layers=4, seed=1).save_pretrained(src)  # same path, new weights
    progress = tmp_path / "p.jsonl"
    cfg = worker_config(src, out, calibration_file).model_copy(
        update={"progress_file": str(progress)}
    )
    quantize(cfg, show_progress=False)
    assert json.loads(progress.read_text().splitlines()[0])["resumed_from_layer"] == 0
