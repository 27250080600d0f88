"""Small models built offline: for the quickstart, the tests and quality comparisons.

No download: the text is the Python standard library's own source, the tokenizer is a
byte-level BPE trained on it, and models come from transformers configs (random weights,
optionally trained for a few hundred steps on CPU so perplexities mean something).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

# Architectures the tests and the quickstart build; sizes are multiples of 128 on purpose
# (the serving kernels' shape rules) except where a test wants otherwise.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, "head_dim": 32}),
    # sliding and full attention layers get different masks and rotary tables
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 2,
            "head_dim": 32,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gpt2": ("GPT2Config", {}),
}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]


def stdlib_text(max_chars: int = 2_000_000, held_out: bool = False) -> str:
    """Python standard-library source in a fixed order: text any machine has offline.

    Every tenth file is held out: ``held_out=True`` returns text only from those, the
    default only from the others, so evaluation text is never trained on.
    """
    parts, size = [], 0
    for i, path in enumerate(_stdlib_files()):
        if (i % 10 == 0) != held_out:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


# The demo models read Python source, so a chat turns into comments they can continue.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '# ' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``text``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(
    model_type: str,
    vocab_size: int,
    hidden: int = 128,
    layers: int = 2,
    intermediate: int = 256,
    heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    **overrides,
):
    """A randomly initialised causal LM of ``model_type`` with fp16-exact weights.

    ``overrides`` go to the config (for example ``layer_types``).
    """
    import transformers

    class_name, extra = TINY_CONFIGS[model_type]
    extra = {**extra, **overrides}
    config_cls = getattr(transformers, class_name)
    if model_type == "gpt2":
        config = config_cls(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=1024,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=tie_word_embeddings,
        )
    else:
        config = config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=tie_word_embeddings,
            **extra,
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # checkpoints store fp16: make the source exactly representable
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def train(
    model,
    ids: torch.Tensor,
    steps: int,
    seqlen: int = 128,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
    device: str = "cpu",
) -> float:
    """AdamW steps of next-token training on random windows of ``ids``; leaves ``model`` on CPU."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    ids = ids.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps)
    )
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # [batch, seqlen]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval().to("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return float(loss.detach())


def build_demo_model(
    directory: str | Path,
    steps: int = 300,
    model_type: str = "llama",
    hidden: int = 256,
    layers: int = 4,
    vocab_size: int = 2048,
    log_every: int = 50,
    device: str = "cpu",
    batch: int = 16,
    seqlen: int = 128,
    train_chars: int = 3_000_000,
) -> dict[str, Path]:
    """Train a small model on stdlib text and save it with calibration and evaluation text.

    Writes ``model/``, ``calibration.txt`` and ``eval.txt`` (held-out files) under
    ``directory`` and returns their paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_text = stdlib_text(train_chars)
    eval_text = stdlib_text(300_000, held_out=True)
    tokenizer = train_tokenizer(train_text, vocab_size)
    model = tiny_model(
        model_type,
        len(tokenizer),
        hidden=hidden,
        layers=layers,
        intermediate=hidden * 3,
        heads=hidden // 64,
    )
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False).input_ids)
    train(model, ids, steps, seqlen=seqlen, batch=batch, log_every=log_every, device=device)
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calib = directory / "calibration.txt"
    calib.write_text(train_text[:600_000])
    held_out = directory / "eval.txt"
    held_out.write_text(eval_text)
    return {"model": model_dir, "calibration": calib, "eval": held_out}
