"""GPTQ checkpoints: write (sharded safetensors + configs) and read back into a torch model.

Layout per quantized module ``name`` (DESIGN.md section 6): ``name.qweight`` int32
``[in*bits/32, out]``, ``name.qzeros`` int32 ``[groups, out*bits/32]``, ``name.scales`` fp16
``[groups, out]``, ``name.g_idx`` int32 ``[in]``, ``name.bias`` fp16 when present.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gptq_worker import __version__
from gptq_worker.config import OVERRIDABLE, CheckpointFormat, QuantizeConfig
from gptq_worker.pack import unpack_qzeros, unpack_rows

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
    """What ``quantize_config.json`` and ``config.json["quantization_config"]`` hold."""
    return {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "true_sequential": cfg.true_sequential,
        "damp_percent": cfg.damp_percent,
        "damp_auto_increment": cfg.damp_auto_increment,
        "mse": cfg.mse,
        "checkpoint_format": cfg.checkpoint_format.value,
        "lm_head": cfg.lm_head,
        "dynamic": cfg.dynamic,
        "pack_dtype": "int32",
        "meta": {"quantizer": [QUANTIZER], "method": cfg.method.value, **(meta or {})},
    }


def read_quantize_config(directory: Path) -> QuantizeConfig:
    """The checkpoint's settings, from ``quantize_config.json`` or ``config.json``.

    Accepts what GPTQModel and AutoGPTQ write too (``format`` for the checkpoint format,
    extra keys ignored).
    """
    raw: dict[str, Any] | None = None
    qc_file = directory / "quantize_config.json"
    if qc_file.exists():
        raw = json.loads(qc_file.read_text())
    else:
        config = json.loads((directory / "config.json").read_text())
        raw = config.get("quantization_config")
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
    if raw.get("mse"):
        fields["mse"] = raw["mse"]
    if raw.get("dynamic"):
        fields["dynamic"] = {
            key: {k: v for k, v in ov.items() if k in OVERRIDABLE}
            for key, ov in raw["dynamic"].items()
        }
    return QuantizeConfig(**fields)


def checkpoint_tensors(
    model: nn.Module, packed: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Everything to save: packed modules in place of their weights, the rest in fp16."""
    quantized = {k.rsplit(".", 1)[0] for k in packed if k.endswith(".qweight")}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in quantized and leaf == "weight":
            for suffix in QUANT_SUFFIXES:
                out[f"{prefix}.{suffix}"] = packed[f"{prefix}.{suffix}"]
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if storage in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(storage)
        out[key] = (
            tensor.detach()
            .to("cpu", torch.float16 if tensor.is_floating_point() else tensor.dtype)
            .contiguous()
        )
    missing = quantized - {k.rsplit(".", 1)[0] for k in out if k.endswith(".qweight")}
    if missing:
        raise ValueError(f"packed modules not found in the model: {sorted(missing)}")
    return out


def write_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    packed: dict[str, torch.Tensor],
    cfg: QuantizeConfig,
    max_shard_size: str = "4GB",
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint into ``directory`` (which must be empty or absent).

    ``meta`` joins ``quantization_config.meta`` (for example the measured perplexities)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, packed)
    _save_shards(directory, tensors, parse_size(max_shard_size))

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


def _save_shards(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it has one."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = fh.get_tensor(key)
    return tensors


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed in memory and is dequantized in each forward.

    The portable torch path: correct on any device, not fast. ``qweight`` stays packed
    (``bits/16`` of the fp16 weight); zero points are kept unpacked, one small
    ``[groups, out]`` tensor in the scales' dtype, so each forward only unpacks codes.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        fmt: CheckpointFormat,
    ) -> None:
        super().__init__()
        self.bits, self.fmt = bits, fmt
        self.in_features, self.out_features = g_idx.shape[0], scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", bias)
        zeros = unpack_qzeros(qzeros, bits, self.out_features, fmt)
        self.register_buffer("zeros", zeros.to(scales.dtype), persistent=False)
        pf = 32 // bits if 32 % bits == 0 else 0
        shifts = torch.arange(pf, dtype=torch.int32) * bits if pf else torch.zeros(0)
        self.register_buffer("shifts", shifts.view(1, -1, 1), persistent=False)

    def codes(self) -> torch.Tensor:
        """``[in, out]`` integer codes, unpacked from ``qweight``."""
        if self.shifts.numel() == 0:  # 3-bit: values straddle words
            return unpack_rows(self.qweight, self.bits, self.in_features)
        words = self.qweight.unsqueeze(1)  # [in/pf, 1, out]
        values = torch.bitwise_right_shift(words, self.shifts) & (2**self.bits - 1)
        return values.reshape(self.in_features, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` weight: ``scale[g] * (code - zero[g])``, computed in ``dtype``."""
        g = self.g_idx.long()
        w = (self.codes().to(dtype) - self.zeros.to(dtype)[g]) * self.scales.to(dtype)[g]
        return w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # fp16 * fp16 rounds exactly like the fp32 product cast to fp16; bf16 would not
        exact = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
        return F.linear(x, self.dequantized_weight(exact).to(x.dtype), bias)

    def packed_bytes(self) -> int:
        """Bytes this module keeps for its weight (packed codes, scales, zeros, g_idx)."""
        tensors = (self.qweight, self.scales, self.zeros, self.g_idx)
        return sum(t.numel() * t.element_size() for t in tensors)


def load_quantized_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild a causal LM from a GPTQ checkpoint with :class:`QuantLinear` modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    qcfg = read_quantize_config(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized modules ourselves
    with _no_init():  # the dense weights are replaced at once: never fill them
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    tensors = load_tensors(directory)
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    for prefix in prefixes:
        settings = qcfg.for_module(prefix)
        if settings is None:
            raise ValueError(f"{prefix} is packed but 'dynamic' says it is not quantized")
        parent, _, child = prefix.rpartition(".")
        module = QuantLinear(
            *(tensors.pop(f"{prefix}.{s}") for s in QUANT_SUFFIXES),
            bias=tensors.pop(f"{prefix}.bias", None),
            bits=settings.bits,
            fmt=qcfg.checkpoint_format,
        )
        setattr(model.get_submodule(parent) if parent else model, child, module)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has tensors the model does not: {result.unexpected_keys}")
    model.tie_weights()
    packed_buffers = {f"{p}.{s}" for p in prefixes for s in (*QUANT_SUFFIXES, "bias")}
    still_missing = [
        k for k in result.missing_keys if k not in packed_buffers and not _is_tied(model, k)
    ]
    if still_missing:
        raise ValueError(f"checkpoint lacks tensors: {still_missing}")
    return model.to(device).eval()


def _no_init():
    """transformers' context that skips random initialisation (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _is_tied(model: nn.Module, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.startswith("lm_head")
        and (out.weight is model.get_input_embeddings().weight)
    )
