"""A text as a model reads it: :class:`Encoded` (token ids, pieces, special tokens, words, character spans), the
one record that the built-in spam model (:func:`lrp.spam.encode`) and Hugging Face tokenizers
(:func:`lrp.pipeline.text.encode`) give, and :func:`words_from_offsets`, which groups tokens into words."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass
class Encoded:
    """A text as the model reads it: token ids, the tokenizer's pieces (with its marks: "Ġ", "▁", "##"), which
    tokens are special, each token's word (words are what lies between spaces in the text; ``None`` for special
    tokens and whitespace) and its characters in the text (``None`` where the tokenizer gives no offsets). For a
    raw e-mail read by the spam model, ``text`` is what the model reads: its subject and body."""

    text: str
    ids: list[int]
    tokens: list[str]
    special: list[bool]
    words: list[Optional[int]]
    spans: list[Optional[tuple[int, int]]]
    truncated: bool = False  # tokens past the model's limit were cut off (the spam model reads its first 512)

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The ids as the model takes them: ``(1, n)`` long."""
        return torch.tensor([self.ids], dtype=torch.long, device=device)

    @property
    def pieces(self) -> list[str]:
        """Each token's characters in ``text`` (see :meth:`piece`)."""
        return [self.piece(k) for k in range(len(self.ids))]

    def piece(self, k: int) -> str:
        """The characters of the text token ``k`` was read from ("" for special tokens, or without offsets)."""
        span = self.spans[k]
        return "" if span is None or self.special[k] else self.text[span[0]:span[1]]


def words_from_offsets(text: str, spans: Sequence[Optional[tuple[int, int]]],
                       special: Sequence[bool]) -> list[Optional[int]]:
    """Each token's word, from its characters in ``text``: the whitespace-separated word that holds the token's
    first non-space character (``None``: special tokens, tokens that cover only whitespace or no characters)."""
    starts, ends = [], []
    for match in re.finditer(r"\S+", text):
        starts.append(match.start())
        ends.append(match.end())
    words: list[Optional[int]] = []
    for span, is_special in zip(spans, special):
        if is_special or span is None or span[1] <= span[0]:
            words.append(None)
            continue
        inner = re.search(r"\S", text[span[0]:span[1]])
        if inner is None:
            words.append(None)
            continue
        k = bisect.bisect_right(starts, span[0] + inner.start()) - 1
        words.append(k if k >= 0 and span[0] + inner.start() < ends[k] else None)
    return words
