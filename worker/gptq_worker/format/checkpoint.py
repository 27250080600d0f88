"""GPTQ checkpoints on disk: write sharded safetensors and configs, read them back.

Layout per quantized module ``name`` (docs/checkpoint-format.md): ``name.qweight`` int32
``[in*bits/32, out]``, ``name.qzeros`` int32 ``[groups, out*bits/32]``, ``name.scales`` fp16
``[groups, out]``, ``name.g_idx`` int32 ``[in]``, ``name.bias`` fp16 when present.

It is longer than 400 lines because writing and reading back share the one layout:
splitting them would put the layout's two halves in different files.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gptq_compat.config import OVERRIDABLE, QuantizeConfig
from gptq_worker import __version__
from gptq_worker.format.tensorfiles import (
    Pending,
    TensorFiles,
    can_stream,
    pending,
    write_safetensors,
)

QUANTIZER = f"gptq-operator:{__version__}"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def parse_size(text: str) -> int:
    """'4GB' -> 4_000_000_000 (decimal units, as Hugging Face uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"max_shard_size {text!r} is not a size like '4GB' or '500MB'")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2) or "B"]
    return int(float(m.group(1)) * unit)


def quantization_config(cfg: QuantizeConfig, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``quantize_config.json`` and ``config.json["quantization_config"]`` hold.

    Static act-order (``desc_act`` with ``static_groups``) leaves ``g_idx`` trivial, so the
    checkpoint is written as loaders expect of one without act-order: ``desc_act: false``
    (vLLM 0.32 and LMDeploy refuse ``desc_act: true``), with the order that was used
    recorded under ``meta.act_order``.
    """
    static = cfg.desc_act and cfg.static_groups
    act_order = "static" if static else ("groups" if cfg.desc_act else "none")
    return {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act and not static,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "true_sequential": cfg.true_sequential,
        "damp_percent": cfg.damp_percent,
        "damp_auto_increment": cfg.damp_auto_increment,
        "mse": cfg.mse,
        "checkpoint_format": cfg.checkpoint_format.value,
        "lm_head": cfg.lm_head,
        "dynamic": _written_dynamic(cfg),
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [QUANTIZER],
            "method": cfg.method.value,
            "act_order": act_order,
            # engine-only settings: the tensors and the keys above do not depend on them
            **({"gptaq": {"alpha": cfg.gptaq_alpha}} if cfg.gptaq else {}),
            **(meta or {}),
        },
    }


def _written_dynamic(cfg: QuantizeConfig) -> dict[str, dict[str, Any]] | None:
    """``dynamic`` as written: overrides that give a module static act-order say
    ``desc_act: false``, as the top-level setting does."""
    if not cfg.dynamic:
        return cfg.dynamic
    out = {}
    for key, overrides in cfg.dynamic.items():
        overrides = dict(overrides)
        if overrides.get("desc_act") and overrides.get("static_groups", cfg.static_groups):
            overrides["desc_act"] = False
        out[key] = overrides
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; CheckpointError naming the file otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a checkpoint needs it (re-quantize or copy it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} cannot be read as JSON ({err}); repair or rewrite it"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object, not {type(data).__name__}; repair or rewrite it"
        )
    return data


def read_quantize_config(directory: Path) -> QuantizeConfig:
    """The checkpoint's settings, from ``quantize_config.json`` or ``config.json``.

    Accepts what GPTQModel and AutoGPTQ write too (``format`` for the checkpoint format,
    extra keys ignored).
    """
    raw: dict[str, Any] | None = None
    qc_file = directory / "quantize_config.json"
    if qc_file.exists():
        raw = read_json(qc_file)
    else:
        config = read_json(directory / "config.json")
        raw = config.get("quantization_config")
        if raw is not None and not isinstance(raw, dict):
            raise CheckpointError(
                f"{directory / 'config.json'}: quantization_config must be a JSON object"
            )
    if not raw:
        raise ValueError(f"{directory} has no quantize_config.json or quantization_config")
    if raw.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{directory} is quant_method {raw['quant_method']!r}, not gptq")
    fields = {
        k: raw[k]
        for k in (
            "bits",
            "group_size",
            "desc_act",
            "sym",
            "static_groups",
            "true_sequential",
            "damp_percent",
            "lm_head",
        )
        if k in raw
    }
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    fields["checkpoint_format"] = fmt
    # a key left out means the format's meaning (off), not the engine's current default
    fields.setdefault("desc_act", False)
    fields.setdefault("static_groups", False)
    fields["mse"] = raw.get("mse") or 0.0
    if raw.get("dynamic"):
        if not isinstance(raw["dynamic"], dict) or not all(
            isinstance(v, dict) for v in raw["dynamic"].values()
        ):
            raise CheckpointError(f"{directory}: 'dynamic' must map module regexes to objects")
        fields["dynamic"] = {
            key: {k: v for k, v in ov.items() if k in OVERRIDABLE}
            for key, ov in raw["dynamic"].items()
        }
    try:
        return QuantizeConfig(**fields)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        where = qc_file if qc_file.exists() else directory / "config.json"
        raise CheckpointError(
            f"{where}: quantization settings are invalid ({problems}); fix the file"
        ) from err


def checkpoint_tensors(
    model: nn.Module, packed: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Everything to save: packed modules in place of their weights, the rest in fp16."""
    return {k: p.make() for k, p in checkpoint_items(model, packed).items()}


def checkpoint_items(model: nn.Module, packed: Mapping[str, torch.Tensor]) -> dict[str, Pending]:
    """:func:`checkpoint_tensors` as tensors still to be made: packed tensors are read (from
    the work directory when ``packed`` is a :class:`TensorFiles`) only when written."""
    quantized = quantized_prefixes(packed)
    out = state_items(model.state_dict().items(), packed, set())
    check_all_written(quantized, out)
    return out


def quantized_prefixes(packed: Mapping[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in packed if k.endswith(".qweight")}


def check_all_written(quantized: set[str], written: Mapping[str, Any]) -> None:
    missing = quantized - {k.rsplit(".", 1)[0] for k in written if k.endswith(".qweight")}
    if missing:
        raise ValueError(f"packed modules not found in the model: {sorted(missing)}")


def state_items(
    state: Iterable[tuple[str, torch.Tensor]],
    packed: Mapping[str, torch.Tensor],
    seen: set[tuple[int, int]],
) -> dict[str, Pending]:
    """The checkpoint's tensors for ``state`` (state_dict entries, in order): packed modules
    in place of their weights, the rest in fp16, storages in ``seen`` (tied weights: stored
    once) skipped and the new ones added to it. A whole state_dict gives
    :func:`checkpoint_items`; consecutive pieces of it, with one ``seen``, give the same
    items piece by piece."""
    quantized = quantized_prefixes(packed)
    out: dict[str, Pending] = {}
    for key, tensor in state:
        prefix, _, leaf = key.rpartition(".")
        if prefix in quantized and leaf == "weight":
            for suffix in QUANT_SUFFIXES:
                name = f"{prefix}.{suffix}"
                if isinstance(packed, TensorFiles):
                    e = packed.entries[name]
                    out[name] = Pending(e.dtype, e.shape, lambda name=name: packed[name])
                else:
                    out[name] = pending(packed[name])
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if storage in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(storage)
        dtype = torch.float16 if tensor.is_floating_point() else tensor.dtype
        out[key] = Pending(
            dtype,
            tuple(tensor.shape),
            lambda t=tensor, dtype=dtype: t.detach().to("cpu", dtype).contiguous(),
        )
    return out


def write_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    packed: Mapping[str, torch.Tensor],
    cfg: QuantizeConfig,
    max_shard_size: str = "4GB",
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint into ``directory`` (which must be empty or absent).

    Tensors are made and written one at a time, so the checkpoint is never whole in
    memory. ``meta`` joins ``quantization_config.meta`` (for example the measured
    perplexities)."""
    directory.mkdir(parents=True, exist_ok=True)
    _save_shards(directory, checkpoint_items(model, packed), parse_size(max_shard_size))
    write_configs(directory, model, tokenizer, cfg, meta)


def write_configs(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    cfg: QuantizeConfig,
    meta: dict[str, Any] | None = None,
) -> None:
    """Everything of a checkpoint but its tensors: the configs and the tokenizer."""
    qc = quantization_config(cfg, meta)
    (directory / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    config.dtype = torch.float16
    config.use_cache = True
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _save_shards(directory: Path, tensors: dict[str, Pending], max_bytes: int) -> None:
    writer = ShardWriter(directory, max_bytes)
    for key, t in tensors.items():
        writer.add(key, t)
    writer.finish()


class ShardWriter:
    """A checkpoint's shards, written as the tensors are added (in checkpoint order).

    A shard is written as soon as the next tensor would not fit in it (or at
    :meth:`finish`), under a temporary name: how many shards there are, and so their
    names, is known only at the end. :meth:`finish` names them
    (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` and the index), as
    ``save_pretrained`` does: the same files whether the tensors come all at once or
    while the layers are still being quantized.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._shard: dict[str, Pending] = {}
        self._size = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, key: str, item: Pending) -> None:
        nbytes = item.nbytes
        if self._shard and self._size + nbytes > self.max_bytes:
            self._flush()
        self._shard[key] = item
        self._size += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written) + 1:05d}.partial"
        _save_shard(path, self._shard, {"format": "pt"})
        self._written.append((path, list(self._shard)))
        self._shard, self._size = {}, 0

    def finish(self) -> None:
        if self._shard or not self._written:
            self._flush()
        if len(self._written) == 1:
            self._written[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        n = len(self._written)
        for i, (path, keys) in enumerate(self._written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )


def _save_shard(path: Path, shard: dict[str, Pending], metadata: dict[str, str]) -> None:
    if can_stream(shard):
        write_safetensors(path, shard, metadata)
    else:  # a dtype the streaming writer does not know: made whole, written by safetensors
        save_file({k: p.make() for k, p in shard.items()}, str(path), metadata=metadata)


class CheckpointError(ValueError):
    """A checkpoint's files are unusable; the message names the file and the fix."""


def read_weight_map(directory: Path) -> dict[str, str] | None:
    """``weight_map`` of ``model.safetensors.index.json``; None when there is no index."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return None
    data = read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index} has no 'weight_map' of tensor name -> file name; rewrite the index"
        )
    return weight_map


def _inside(directory: Path, path: Path, what: str) -> Path:
    """``path`` if it (after symlinks) lies directly in ``directory``, else CheckpointError."""
    root = directory.resolve()
    if path.resolve().parent != root:
        raise CheckpointError(
            f"{what} resolves to {path.resolve()}, outside the checkpoint directory {root}; "
            "the index must list files in the directory (copy the shard in, no symlinks out)"
        )
    return path


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it has one.

    Files must lie in ``directory`` itself: an index entry like ``../x.safetensors`` or an
    absolute path, or a symlink that resolves elsewhere, is refused with CheckpointError.
    """
    weight_map = read_weight_map(directory)
    if weight_map is not None:
        out = []
        for name in sorted(set(weight_map.values())):
            entry = f"model.safetensors.index.json entry {name!r}"
            if Path(name).is_absolute() or Path(name).name != name:
                raise CheckpointError(
                    f"{directory / 'model.safetensors.index.json'}: {entry} is not a file name "
                    "in the checkpoint directory; the index must list files in the directory"
                )
            out.append(_inside(directory, directory / name, entry))
        return out
    single = directory / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [_inside(directory, single, str(single))]
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = fh.get_tensor(key)
    return tensors
