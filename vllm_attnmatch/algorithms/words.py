"""Whole words as the unit of selection: a key's score is the largest of its word's tokens.

Why: facts are numbers and names, and tokenizers cut them into pieces (SmolLM2 writes each digit of a
number as its own token after a lone space; a rare name is two or three pieces). Scored one token at a
time, some pieces of a fact survive a compaction and others do not; the copy of a number then jumps to
another number's digits, and a question answers with a blend of two planted values. Scoring by word keeps
a number or a name whole or drops it whole. On DEV retrieval tasks (1024-token documents, KVzip's score)
accuracy retained went from 52 % to 77 % at r = 0.25 and from 0 % to 38 % at r = 0.1
(``benchmarks/results/recall_dev_words.md``).

Pure functions over token pieces (the decoded text of each token), so no tokenizer is imported here.
"""

from __future__ import annotations

import torch


def _wordy(piece: str) -> bool:
    return any(c.isalnum() for c in piece)


def word_ids(pieces: list[str]) -> torch.Tensor:
    """``(T,)`` the word each token belongs to. A token starts a word when it begins with whitespace, has no
    letter or digit (punctuation), or follows punctuation; any other token continues the word before it —
    so the digits after a lone space are one word with it, and a name's pieces are one word."""
    out, word = [], -1
    for i, piece in enumerate(pieces):
        prev = pieces[i - 1] if i else ""
        starts = i == 0 or piece[:1].isspace() or not _wordy(piece) or not (_wordy(prev) or prev.isspace())
        word += starts
        out.append(word)
    return torch.tensor(out, dtype=torch.long)


def word_max(scores: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``(H, T)`` scores with each token's replaced by the largest of its word's tokens (``words (T,)``
    from :func:`word_ids`, non-decreasing)."""
    H, T = scores.shape
    if words.shape != (T,):
        raise ValueError(f"{T} scores per head but {tuple(words.shape)} word ids")
    index = words.to(scores.device).expand(H, -1)
    best = torch.full((H, int(words.max()) + 1), float("-inf"), dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce(1, index, scores, "amax").gather(1, index)


class TokenPieces:
    """The decoded text of token ids, one decode per distinct id (a vocabulary is decoded lazily, once)."""

    def __init__(self, decode) -> None:
        self._decode = decode
        self._cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            piece = self._cache.get(i)
            if piece is None:
                piece = self._cache[i] = self._decode([i])
            out.append(piece)
        return out
