"""The ``quantize`` command end to end from local disk: wall time, peak host RSS, peak GPU.

Saves a model of a real shape (random fp16 weights, written tensor by tensor in 5 GB
shards as ``save_pretrained`` shards them, with a byte-level BPE tokenizer and
pre-tokenized random calibration ids) under ``--dir``, then runs
``python -m gptq_worker.cli quantize`` on it as a child process and measures, from process
start to exit (the checkpoint written, validated and published):

- wall seconds, and the split read from the progress file (start of the first layer,
  layers, writing and validating);
- peak resident set size of the process (psutil, polled every 20 ms: a spike shorter
  than that can be missed);
- peak GPU memory: the run's own ``peak_gpu_gib`` (tensors: ``torch.cuda.max_memory_
  allocated``) and the device's used memory polled through NVML (allocator cache and
  CUDA context included), when NVML is there.

The page cache holds the model just written; ``--drop-caches`` (root only) drops it first
so the weights come from the disk itself. Run on the GPU machine from the repository root:

    python bench/e2e.py --shape llama-3-8b
    python bench/e2e.py --shape llama-3-70b --layers 4   # a prefix of a 70B model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SHAPES

from gptq_compat.sizing import expected_peak_bytes, worker_memory
from gptq_worker.format.tensorfiles import Pending, write_safetensors

SHARD_BYTES = 5 * 10**9


def save_model(directory: Path, shape: dict, seqlen: int) -> int:
    """A random fp16 model of ``shape`` in ``directory``; returns its bytes of weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gptq_worker.demo.models import stdlib_text, train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, max_position_embeddings=max(4096, seqlen), dtype="float16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    pool = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    offset = [0]

    def random_tensor(shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float16)
        if len(shape) == 1:
            return out.fill_(1.0)  # norms
        flat, done = out.view(-1), 0
        while done < flat.numel():
            n = min(flat.numel() - done, pool.numel() - offset[0])
            flat[done : done + n] = pool[offset[0] : offset[0] + n]
            done += n
            offset[0] = (offset[0] + n) % (pool.numel() - 1) + 1  # shift so slices differ
        return out

    shards: list[dict[str, Pending]] = [{}]
    size = 0
    for name, p in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        item = Pending(torch.float16, tuple(p.shape), lambda s=tuple(p.shape): random_tensor(s))
        if shards[-1] and size + item.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = item
        size += item.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / file, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(p.nbytes for s in shards for p in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    train_tokenizer(stdlib_text(200_000), vocab_size=1024).save_pretrained(directory)
    return total


class Peaks:
    """Polls a process's RSS (with its children) and the GPU's used memory."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.period = period
        self.rss = 0
        self.gpu_used = None
        self._stop = threading.Event()
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            self.base_gpu = pynvml.nvmlDeviceGetMemoryInfo(self._nvml[1]).used
            self.gpu_used = 0
        except Exception:
            self._nvml = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
                rss += sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.rss = max(self.rss, rss)
            except psutil.Error:
                pass
            if self._nvml is not None:
                nvml, handle = self._nvml
                used = nvml.nvmlDeviceGetMemoryInfo(handle).used - self.base_gpu
                self.gpu_used = max(self.gpu_used, used)
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def whole_model_bytes(prefix_bytes: int, shape: dict, layers: int) -> int:
    """The fp16 bytes of the model with all ``layers`` decoder layers, from those of a
    prefix of ``shape["num_hidden_layers"]``: the parts outside the layers (embeddings,
    ``lm_head`` unless tied, final norm) once, the rest scaled to the full count."""
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    tied = shape.get("tie_word_embeddings", False)
    outside = 2 * (vocab * hidden * (1 if tied else 2) + hidden)
    per_layer = (prefix_bytes - outside) / shape["num_hidden_layers"]
    return round(outside + per_layer * layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="llama-3-8b")
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    p.add_argument("--dir", default="/tmp/gptq-e2e")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--plain", action="store_true", help="the paper's GPTQ, not the default")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache first")
    p.add_argument("--keep", action="store_true", help="keep the model and output")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --keep before: use the model already in DIR (same shape) instead of saving one",
    )
    p.add_argument("--verbose", action="store_true", help="the command logs its steps' times")
    p.add_argument(
        "--bytecode-cache",
        metavar="DIR",
        help="give the command Python's bytecode cache in DIR (PYTHONPYCACHEPREFIX), filled "
        "by one untimed import of its modules first: as in the worker image, whose pip "
        "install byte-compiles; without it, where site-packages is not writable (the device "
        "machine's image), every run compiles transformers' sources again (3.3 s on an H200 "
        "machine)",
    )
    p.add_argument("extra", nargs="*", help="more flags for quantize, after --")
    args = p.parse_args()

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    root = Path(args.dir)
    model_dir, out_dir = root / "model", root / "out"
    config_file = model_dir / "config.json"
    reuse = (
        args.reuse
        and config_file.is_file()
        and all(json.loads(config_file.read_text()).get(k) == v for k, v in shape.items())
    )
    if reuse:
        shutil.rmtree(out_dir, ignore_errors=True)
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        weight_bytes = index["metadata"]["total_size"]
        print(f"reusing the {weight_bytes / 1e9:.1f} GB model in {model_dir}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        t = time.monotonic()
        weight_bytes = save_model(model_dir, shape, args.seqlen)
        print(f"saved {weight_bytes / 1e9:.1f} GB in {time.monotonic() - t:.1f}s", flush=True)
    calib = root / "calibration.jsonl"
    ids = torch.randint(
        0,
        shape["vocab_size"],
        (args.nsamples, args.seqlen),
        generator=torch.Generator().manual_seed(0),
    )
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    # the saved model (and the removed output) reach the disk before the clock starts: a
    # user's model is not gigabytes of dirty pages being written back beside the run (on an
    # H100 the run right after saving had a first layer of 3.0 s, the next one 2.1 s)
    t = time.monotonic()
    os.sync()
    print(f"synced in {time.monotonic() - t:.1f}s", flush=True)
    if args.drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    progress_file = root / "progress.jsonl"
    progress_file.unlink(missing_ok=True)
    shutil.rmtree(root / f".{out_dir.name}.gptq-work", ignore_errors=True)  # no resuming
    cmd = [
        sys.executable, "-m", "gptq_worker.cli", *(["-v"] if args.verbose else []), "quantize",
        "--model", str(model_dir), "--output", str(out_dir),
        "--calibration", str(calib), "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen), "--progress-file", str(progress_file),
        "--no-progress-bar",
    ]  # fmt: skip
    if args.plain:
        cmd += ["--no-desc-act", "--no-static-groups", "--no-gptaq"]
    cmd += args.extra
    env = dict(os.environ)
    if args.bytecode_cache:
        env["PYTHONPYCACHEPREFIX"] = str(Path(args.bytecode_cache).resolve())
        warm = (
            "import gptq_worker.cli, gptq_worker.pipeline.run, gptq_worker.quant.solve_triton; "
            "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer; "
            "import transformers.models.llama.modeling_llama"
        )
        # written by this step even where PYTHONDONTWRITEBYTECODE is set (the device image
        # sets it): with a prefix and nothing written there, Python ignores the packages'
        # own __pycache__ too and compiles every module (measured: slower than no prefix)
        write = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-c", warm], env=write, check=True)
    started = time.time()
    t = time.monotonic()
    child = subprocess.Popen(cmd, env=env)
    peaks = Peaks(child.pid)
    rc = child.wait()
    wall = time.monotonic() - t
    peaks.stop()
    events = [json.loads(line) for line in progress_file.read_text().splitlines()]
    start = next((e for e in events if e["event"] == "start"), None)
    layers = [e for e in events if e["event"] == "layer"]
    done = next((e for e in events if e["event"] == "done"), {})
    layer_s, prev = [], start["time"] if start else started
    for e in layers:
        layer_s.append(round(e["time"] - prev, 3))
        prev = e["time"]
    full_bytes = whole_model_bytes(weight_bytes, shape, SHAPES[args.shape]["num_hidden_layers"])
    result = {
        "shape": args.shape,
        "layers": shape["num_hidden_layers"],
        "tokens": f"{args.nsamples}x{args.seqlen}",
        "config": "plain" if args.plain else "default",
        "extra_flags": args.extra,
        "returncode": rc,
        "model_gb": round(weight_bytes / 1e9, 2),
        "checkpoint_gb": round(
            sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 1e9, 2
        ),
        "wall_s": round(wall, 2),
        "to_first_layer_s": round(start["time"] - started, 2) if start else None,
        "layers_s": round(layers[-1]["time"] - start["time"], 2) if layers else None,
        "write_validate_s": round(done["time"] - layers[-1]["time"], 2)
        if done and layers
        else None,
        "s_per_layer_median": sorted(layer_s)[len(layer_s) // 2] if layer_s else None,
        "layer_s": layer_s,
        "peak_rss_gib": round(peaks.rss / 2**30, 2),
        # what the operator would request for the whole model (gptq_compat.sizing; for a
        # prefix of layers, the size of all of them: the peak does not grow with the layer
        # count, the formula does), and the line the worker checks its memory limit against
        "sizing_model_gb": round(full_bytes / 1e9, 2),
        "sizing_expected_peak_gib": round(expected_peak_bytes(full_bytes) / 2**30, 2),
        "sizing_request": worker_memory(full_bytes),
        "peak_gpu_tensors_gib": done.get("peak_gpu_gib"),
        "peak_gpu_used_gib": round(peaks.gpu_used / 2**30, 2) if peaks.gpu_used else None,
        # GPTQ_WORKER_PROFILE=1: the phases of the first three layers (synchronized at each
        # phase's end, so the layers are slower); the engine's switches that were set
        **(
            {"phases_s": [e["phases_s"] for e in layers[:3]]}
            if layers and "phases_s" in layers[0]
            else {}
        ),
        "engine_env": {k: v for k, v in os.environ.items() if k.startswith("GPTQ_WORKER_")},
        "page_cache_dropped": args.drop_caches,
        "bytecode_cache": bool(args.bytecode_cache),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
