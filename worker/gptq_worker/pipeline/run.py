"""One quantization run, start to finish: what ``gptq-worker quantize`` does.

It is longer than 400 lines because a run's steps, from checking the output to publishing
the checkpoint, are one sequence and read together.

Crash safety: all work happens in ``.<output-name>.gptq-work/`` beside the output. The
finished checkpoint is written there, validated, and only then renamed to the output
path, so a checkpoint at the output path is always complete. The work directory keeps
finished layers, so running the same command again resumes after the last one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from gptq_compat.config import WorkerConfig
from gptq_worker.arch import architecture_for
from gptq_worker.device import resolve_device, resolve_dtype
from gptq_worker.format.checkpoint import write_checkpoint, write_configs
from gptq_worker.format.validate import Report, validate_checkpoint
from gptq_worker.memory import check_fits, memory_limit, weights_bytes
from gptq_worker.pipeline.calibration import batches, calibration_samples, fingerprint
from gptq_worker.pipeline.capture import capture_inputs
from gptq_worker.pipeline.checkpoint_stream import CheckpointStream
from gptq_worker.pipeline.clock import since
from gptq_worker.pipeline.driver import EngineOptions, quantize_layers, warm_up_solver
from gptq_worker.pipeline.plan import plan
from gptq_worker.pipeline.source import StreamedLayers, open_streamed
from gptq_worker.pipeline.state import WorkState
from gptq_worker.progress.events import Progress
from gptq_worker.progress.kube import report_model_size

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A problem with the run's inputs or environment, reported to the user as is."""


def work_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.gptq-work"


def lock_file_for(output: Path) -> Path:
    return output.parent / f".{output.name}.gptq-lock"


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``output`` for a whole run; a second run fails at once."""
    path = lock_file_for(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunError(f"output {output} is not writable: {err.strerror} ({path})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunError(
                f"another gptq-worker run is writing {output} (pid {holder}); wait for it "
                "or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race)


def check_output(output: Path, overwrite: bool) -> Path:
    """Fail before any work if the output cannot be written; returns the work directory."""
    if output.exists() and not output.is_dir():
        raise RunError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise RunError(
            f"output {output} exists and is not empty; choose another path or pass --overwrite "
            "(in a QuantizationJob: spec.output.overwrite: true)"
        )
    work = work_dir_for(output)
    try:
        work.mkdir(parents=True, exist_ok=True)
        probe = work / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunError(f"output {output} is not writable: {err.strerror} ({work})") from err
    return work


def open_model(
    source: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None = None
) -> tuple[torch.nn.Module, object, StreamedLayers | None]:
    """Model, tokenizer, and the reader of its decoder layers when they are left on disk.

    A local directory of safetensors is streamed (``source.py``): only the parts outside
    the decoder layers are loaded now. Anything else is :func:`load_model`'s, whole.
    """
    _check_model_path(source)
    streamed = open_streamed(source, dtype, trust_remote_code)
    if streamed is not None:
        model, layers = streamed
        log.info("model opened (layers left on disk), %s", since())
        return model, _load_tokenizer(source, trust_remote_code, None), layers
    return (*load_model(source, dtype, trust_remote_code, revision), None)


# what a model's directory needs for quantizing: weights, configs, tokenizer files
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.py"]
HUB_BIN_FILES = [*HUB_FILES, "*.bin", "*.bin.index.json"]


def fetch_model(source: str, revision: str | None) -> str:
    """``source`` itself when it is a local path, else the local directory of a Hugging Face
    model id at ``revision``, downloaded into the Hub cache first (``HF_HOME``) when it is
    not there yet. A downloaded model is then streamed from disk like a local one, so host
    memory follows the sizing formula whatever the model's size."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        if revision is not None:
            raise RunError(
                f"revision {revision!r} applies to Hugging Face model ids, not to the local "
                f"directory {source}: leave it out, or check the revision out there"
            )
        return source
    if source.count("/") != 1:
        _check_model_path(source)  # raises: neither a path nor org/name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(source, revision=revision, allow_patterns=HUB_FILES)
        if not any(Path(local).glob("*.safetensors")):  # an older model: PyTorch pickles
            local = snapshot_download(source, revision=revision, allow_patterns=HUB_BIN_FILES)
        return local
    except LocalEntryNotFoundError as err:
        raise RunError(
            f"model {source} is not in the Hugging Face cache and cannot be downloaded "
            f"(offline, or the Hub cannot be reached): {err}"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise RunError(f"could not download model {source}: {err}") from err


def _check_model_path(source: str) -> None:
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise RunError(
            f"model {source} does not exist (expected a local directory or a "
            "Hugging Face id like org/name)"
        )
    if path.exists() and not (path / "config.json").exists():
        raise RunError(f"model directory {path} has no config.json; is it a Hugging Face model?")


def _load_tokenizer(source: str, trust_remote_code: bool, revision: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise RunError(f"could not load model {source}: {err}") from err


def load_model(
    source: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None = None
):
    """Model (on CPU) and tokenizer from a local directory or a Hugging Face model id."""
    from transformers import AutoModelForCausalLM

    _check_model_path(source)
    tokenizer = _load_tokenizer(source, trust_remote_code, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=True,
            revision=revision,
        )
    except (OSError, ValueError) as err:
        raise RunError(f"could not load model {source}: {err}") from err
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def run_fingerprint(cfg: WorkerConfig, model_config: dict, samples_fp: str, dtype: str) -> str:
    """Everything that decides the result: a run with another fingerprint does not resume."""
    source = Path(cfg.model).expanduser()
    weights = (
        sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.glob("*.safetensors")
        )
        if source.is_dir()
        else []
    )
    payload = {
        "model": cfg.model,
        "weights": weights,
        "model_config": model_config,
        "quantization": cfg.quantization.model_dump(mode="json"),
        "calibration": samples_fp,
        "dtype": dtype,
        "batch_size": cfg.batch_size,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def quantize(
    cfg: WorkerConfig, show_progress: bool = True, on_layer: Callable[[int], None] | None = None
) -> Path:
    """Quantize ``cfg.model`` into ``cfg.output``; returns the output path.

    ``on_layer(i)`` is called after decoder layer ``i`` is finished and saved.
    """
    return quantize_and_validate(cfg, show_progress, on_layer)[0]


def quantize_and_validate(
    cfg: WorkerConfig, show_progress: bool = True, on_layer: Callable[[int], None] | None = None
) -> tuple[Path, Report]:
    """:func:`quantize`, also returning the validator's report of the published checkpoint
    (the run validates it before publishing, so callers need not read it again)."""
    output = Path(cfg.output).expanduser().resolve()
    with output_lock(output):
        return _quantize(cfg, output, show_progress, on_layer)


def _quantize(
    cfg: WorkerConfig, output: Path, show_progress: bool, on_layer: Callable[[int], None] | None
) -> tuple[Path, Report]:
    started = time.monotonic()
    log.info("run starts, %s", since())
    for what, source in (("model", cfg.model), ("calibration data", cfg.calibration.dataset)):
        path = Path(source).expanduser().resolve() if source else None
        if (
            path is not None
            and (path.exists() or what == "model")
            and (path == output or path.is_relative_to(output) or output.is_relative_to(path))
        ):
            raise RunError(
                f"output {output} overlaps the {what} {source} (the same path, or one "
                "inside the other); writing it could delete the source: choose an output "
                "outside both"
            )
    work = check_output(output, cfg.overwrite)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.calibration.dataset is None:
        raise RunError(
            "no calibration data: pass --calibration PATH (a .txt/.jsonl/.parquet "
            "file or a directory of them) or a Hugging Face dataset name"
        )
    model_dir = fetch_model(cfg.model, cfg.revision)
    model_bytes = weights_bytes(model_dir)
    if model_bytes is not None:
        if device.type == "cuda":  # the formula was measured on GPU runs
            check_fits(model_bytes, memory_limit())
        report_model_size(model_bytes)
    # the Triton kernels compile in a child process while the model is opened
    options = EngineOptions(hessian_precision=cfg.hessian_precision)
    warm_up_solver(
        device, options, in_child=True, cfg=cfg.quantization, norms=_norm_shape(model_dir, dtype)
    )
    model, tokenizer, layers = open_model(model_dir, dtype, cfg.trust_remote_code)
    log.info("model and tokenizer opened, %s", since())
    progress = None
    staging = work / "checkpoint"
    if staging.exists():
        shutil.rmtree(staging)
    # streamed: the shards are written while the layers are quantized
    shards = CheckpointStream(staging, cfg.max_shard_size) if layers is not None else None
    try:
        packed, progress, perplexity = quantize_model(
            model, tokenizer, cfg, device, work, show_progress, on_layer, layers, shards
        )
        log.info("layers done, %s", since())
        meta = {"perplexity": perplexity} if perplexity else None
        if shards is not None and shards.started:
            shards.finish(model, packed)
            write_configs(staging, model, tokenizer, cfg.quantization, meta)
        else:
            write_checkpoint(
                staging, model, tokenizer, packed, cfg.quantization, cfg.max_shard_size, meta
            )
        log.info("checkpoint written, %s", since())
        report = validate_checkpoint(staging)
        log.info("checkpoint validated, %s", since())
        if report.errors:
            raise RunError("the written checkpoint failed validation: " + "; ".join(report.errors))
        _publish(staging, output, work)
        gpu = {}
        if device.type == "cuda":  # what the run's tensors took at most (not the cache)
            gpu["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        progress.emit(
            "done",
            output=str(output),
            elapsed_s=round(time.monotonic() - started, 3),
            kernels=report.loadable_kernels(),
            perplexity=perplexity,
            **gpu,
        )
    except BaseException as err:
        if shards is not None:
            shards.abort()
        if progress is not None:
            progress.emit("failed", error=str(err) or type(err).__name__)
        raise
    finally:
        if progress is not None:
            progress.close()
    shutil.rmtree(work, ignore_errors=True)
    log.info("published, work directory removed, %s", since())
    return output, report


def _norm_shape(model_dir: str | Path, dtype: torch.dtype) -> tuple[int, torch.dtype] | None:
    """The width of the model's norms (its config's ``hidden_size``) and the run's dtype, for
    the warm-up; None where config.json does not say."""
    try:
        hidden = json.loads((Path(model_dir) / "config.json").read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        return None
    return (hidden, dtype) if isinstance(hidden, int) and 0 < hidden <= 1 << 16 else None


def quantize_model(
    model,
    tokenizer,
    cfg: WorkerConfig,
    device: torch.device,
    work: Path,
    show_progress: bool = True,
    on_layer: Callable[[int], None] | None = None,
    streamed: StreamedLayers | None = None,
    shards: CheckpointStream | None = None,
) -> QuantizeResult:
    """Quantize ``model`` in place (its weights become the dequantized ones; with ``streamed``,
    the model's decoder layers are read from disk and dropped when done).

    Returns the packed tensors of every quantized module, the open progress reporter, and
    the perplexities before and after when ``cfg.evaluation`` asks for them.
    Finished layers are kept under ``work`` and reused when the same run starts again.
    ``shards`` (streamed runs) starts writing the checkpoint once the inputs are captured;
    the caller finishes it.
    """
    options = EngineOptions(hessian_precision=cfg.hessian_precision)
    warming = warm_up_solver(device, options, cfg=cfg.quantization)  # while inputs are prepared
    arch = architecture_for(model)
    settings = plan(model, arch, cfg.quantization)
    nsamples, seqlen = cfg.calibration.resolved()
    samples = calibration_samples(
        cfg.calibration.dataset, tokenizer, nsamples, seqlen, cfg.calibration.seed
    )
    log.info("calibration samples read, %s", since())
    layers = model.get_submodule(arch.layers)
    state = WorkState(
        work / "state",
        run_fingerprint(
            cfg, model.config.to_dict(), fingerprint(samples), str(next(model.parameters()).dtype)
        ),
    )
    resumed_from = state.open()
    if resumed_from:  # said where a user reads it: the terminal, or the pod's log
        print(
            f"gptq-worker: resuming {cfg.output}: {resumed_from}/{len(layers)} layers were "
            f"finished by an earlier run (work directory {state.dir}); continuing with layer "
            f"{resumed_from + 1}",
            file=sys.stderr,
            flush=True,
        )
    progress = Progress(
        cfg.progress_file, len(layers), show_bar=show_progress, resumed_from=resumed_from
    )
    progress.emit(
        "start",
        model=cfg.model,
        output=cfg.output,
        layers=len(layers),
        modules=len(settings),
        samples=int(samples.shape[0]),
        seqlen=seqlen,
        device=str(device),
        resumed_from_layer=resumed_from,
    )
    try:
        evaluation = None
        if cfg.evaluation is not None:
            from gptq_worker.eval.perplexity import text_ids, windows
            from gptq_worker.pipeline.eval_stream import EvalStreams

            ids = _evaluation_ids(cfg.evaluation.text, tokenizer, text_ids)
            evaluation = EvalStreams.capture(
                model,
                arch,
                windows(ids, cfg.evaluation.seqlen or seqlen, cfg.evaluation.max_samples),
                device,
            )
        acts = capture_inputs(model, arch, list(batches(samples, cfg.batch_size)), device)
        log.info("calibration inputs captured, %s", since())

        def ready() -> None:  # before the first solve: the first layer's forwards overlap
            if warming is not None:
                warming.wait()
            log.info("solver kernel ready, %s", since())

        if shards is not None:
            shards.start(model, arch.layers, state.layer_file)
        packed = quantize_layers(
            model,
            arch,
            cfg.quantization,
            settings,
            acts,
            device,
            state,
            progress,
            on_layer,
            evaluation,
            options,
            streamed,
            shards.layer_released if shards is not None and shards.started else None,
            ready,
        )
        if warming is not None:  # no thread of it runs on (a run with nothing to solve)
            warming.wait()
    except BaseException as err:  # not waited for: the error is said at once
        progress.emit("failed", error=str(err) or type(err).__name__)
        progress.close()
        raise
    perplexity = None
    if evaluation is not None:
        perplexity = {
            "before": round(evaluation.ppl_before, 4),
            "after": round(evaluation.ppl_after, 4),
        }
        progress.emit(
            "evaluated",
            perplexity_before=perplexity["before"],
            perplexity_after=perplexity["after"],
        )
    return QuantizeResult(packed, progress, perplexity)


class QuantizeResult(NamedTuple):
    packed: Mapping[str, torch.Tensor]
    progress: Progress
    perplexity: dict[str, float] | None  # {"before", "after"} when evaluation was asked for


def _publish(staging: Path, output: Path, work: Path) -> None:
    """Move the finished checkpoint to ``output`` with renames only.

    A checkpoint is a model file: readable by everyone (files 0644, directories 0755)
    whatever the worker's umask, so a serving pod that runs as another user reads it."""
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    if output.exists():
        old = work / "previous-output"
        os.replace(output, old)
    os.replace(staging, output)


def _evaluation_ids(source: str, tokenizer, text_ids) -> torch.Tensor:
    """Token ids of the evaluation data: a plain text file as it is; anything calibration
    reads (.txt/.jsonl/.parquet files, a directory, a hub dataset name) as documents."""
    from gptq_worker.pipeline.calibration import (
        CalibrationError,
        read_documents,
        token_stream,
    )

    path = Path(source).expanduser()
    if path.is_file() and path.suffix not in (".jsonl", ".parquet"):
        return text_ids(source, tokenizer)  # as `gptq-worker eval` reads it
    stream = token_stream(read_documents(source, role="evaluation"), tokenizer)
    if not stream:
        raise CalibrationError(f"evaluation data {source} has no text")
    return torch.tensor(stream, dtype=torch.int64)
