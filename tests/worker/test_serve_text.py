"""Incremental detokenization: the streamed deltas add up to the full decode, each token
costs a short window's decode (not the whole text's), and a multi-byte character is sent
only once all of its bytes are there."""

from __future__ import annotations

import random

import pytest

from gptq_worker.serve.text import TextStream

MULTIBYTE = "naïve café — 漢字かな 😀👍🏽 Ωμέγα ü\n\tdef f(x): return x  # ✓"


class Counting:
    """A tokenizer proxy that counts how many ids ``decode`` was given in all."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def streamed(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in ids:
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(stream.flush())
    return deltas, False


@pytest.fixture(scope="module")
def sentencepiece_like(corpus):
    """A Metaspace (SentencePiece-style, leading "▁") BPE with byte fallback, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator([corpus[:100_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("which", ["byte-level", "sentencepiece-like"])
def test_deltas_add_up_to_the_full_decode(which, tokenizer, sentencepiece_like, corpus):
    tok = tokenizer if which == "byte-level" else sentencepiece_like
    rng = random.Random(0)
    texts = [MULTIBYTE, corpus[5000:7000], "  leading spaces\n\n  and  doubled  ", "😀" * 5]
    cases = [tok(t, add_special_tokens=False).input_ids for t in texts]
    # random ids, specials and stray bytes included: the full decode is the reference
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 80))] for _ in range(200)]
    for ids in cases:
        deltas, stopped = streamed(tok, ids)
        assert not stopped
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True), ids


def test_a_multibyte_character_is_sent_whole(tokenizer):
    ids = tokenizer(MULTIBYTE, add_special_tokens=False).input_ids
    assert len(ids) > len(MULTIBYTE.encode()) // 2  # byte-level: many characters span tokens
    deltas, _ = streamed(tokenizer, ids)
    assert "".join(deltas) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens waited for the rest of a char


def test_each_token_decodes_a_short_window(tokenizer, corpus):
    """Linear, not quadratic: the ids given to decode stay within a few per token."""
    ids = tokenizer(corpus[:20_000], add_special_tokens=False).input_ids[:2000]
    counting = Counting(tokenizer)
    deltas, _ = streamed(counting, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert counting.decoded < 8 * len(ids)  # re-decoding everything would be ~len(ids)**2 / 2


def test_stop_string_made_of_multibyte_characters(tokenizer):
    text = "prefix 漢字かな suffix"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, stopped = streamed(tokenizer, ids, stop=("かな",))
    assert stopped and "".join(deltas) == "prefix 漢字"
