"""From sampled token ids to streamed text, and sampling itself.

:class:`TextStream` detokenizes incrementally: each new token costs the decoding of a short
window (the tokens since the last character boundary, plus the ones before them that were
already shown), never of the whole text. The window's text minus the text of its settled
part is the new text; a window whose text ends in U+FFFD (an incomplete UTF-8 character
from byte-level tokens) waits for more tokens. Joined, the deltas equal the full decode of
the generated ids (tested on the tokenizers the tests build and on byte tokens).
"""

from __future__ import annotations

import torch

REPLACEMENT = "\ufffd"


class TextStream:
    """Turns generated token ids into text deltas, holding back what may still change.

    Held back: a trailing partial UTF-8 character and a tail that could be the start of a
    stop string. A stop string ends the text just before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:] is decoded for each new token
        self.settled = 0  # ids[start:settled] end on a character boundary ...
        self.settled_text = ""  # ... and decode to this, already moved to pending
        self.pending = ""  # decoded, not yet sent (may begin a stop string)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Move the window's new complete text to ``pending``."""
        text = self._decode(self.ids[self.start :])
        if not final and (text.endswith(REPLACEMENT) or len(text) <= len(self.settled_text)):
            return  # an unfinished character, or a token with no text (yet)
        self.pending += text[len(self.settled_text) :]
        # the next window starts at the old boundary, so a token whose text depends on the
        # one before it (SentencePiece's leading space) is decoded with that context
        self.start, self.settled = self.settled, len(self.ids)
        self.settled_text = self._decode(self.ids[self.start : self.settled])

    def push(self, token: int) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string was hit)."""
        self.ids.append(token)
        self._advance(final=False)
        hit = self._first_stop()
        if hit is not None:
            delta, self.pending = self.pending[:hit], ""
            return delta, True
        end = len(self.pending) - self._partial_stop(self.pending)
        delta, self.pending = self.pending[:end], self.pending[end:]
        return delta, False

    def flush(self) -> str:
        """The held-back tail, once generation has ended without a stop string."""
        self._advance(final=True)
        delta, self.pending = self.pending, ""
        return delta

    def _first_stop(self) -> int | None:
        found = [i for s in self.stop if (i := self.pending.find(s)) >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def sample(logits: torch.Tensor, s, generator: torch.Generator | None) -> int:
    """One token from ``logits`` ``[vocab]``: greedy at temperature 0, else top-p sampling."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p  # always keeps one
        sorted_probs = sorted_probs * keep
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
