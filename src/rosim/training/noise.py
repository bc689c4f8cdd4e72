"""BART-style source noise for stage 1: whole-word masking with jieba (spec §B, ``masked_encode``).

Each jieba word of a text is selected with probability ``word_prob`` (0.15). A selected word has all
of its tokens replaced by ``[MASK]`` (80%), kept unchanged (10%) or replaced by random tokens (10%).
The noise is applied to the *source* side of a row only, and only to a fraction ``row_prob`` (0.5) of
the rows; the target is always clean. Every decision comes from a NumPy ``Generator`` the caller
passes, so the noise is reproducible for a seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from rosim.errors import InputError
from rosim.tokenization.tokenizer import SPECIAL_TOKENS, CharTokenizer

_JIEBA = None


def jieba_cut(text: str) -> list[str]:
    """Words of ``text`` (jieba's default dictionary, precise mode, HMM on); the logger kept quiet."""
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _JIEBA = jieba.Tokenizer()
    return _JIEBA.lcut(text)


@dataclass(frozen=True)
class WholeWordMasking:
    """Whole-word masking of one text into token ids (no [CLS]/[SEP]).

    Parameters
    ----------
    tokenizer : the char tokenizer whose ids are produced.
    word_prob : probability that a word is selected (0.15).
    mask_prob, keep_prob : of a selected word, the share replaced by [MASK] (0.8) and kept (0.1);
        the rest (0.1) becomes random non-special tokens.
    """

    tokenizer: CharTokenizer
    word_prob: float = 0.15
    mask_prob: float = 0.8
    keep_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("word_prob", "mask_prob", "keep_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {value!r}")
        if self.mask_prob + self.keep_prob > 1.0 + 1e-9:
            raise InputError(f"mask_prob + keep_prob must not exceed 1, got {self.mask_prob} + {self.keep_prob}")

    def _random_ids(self) -> np.ndarray:
        specials = {self.tokenizer.vocab[t] for t in SPECIAL_TOKENS}
        return np.array([i for i in range(len(self.tokenizer)) if i not in specials], dtype=np.int64)

    def __call__(self, text: str, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
        """Return ``(ids, selected)``: the noisy token ids and, per token, whether its word was selected."""
        ids: list[int] = []
        selected: list[bool] = []
        candidates = None
        for word in jieba_cut(text):
            word_ids = self.tokenizer.encode_ids(word)
            if not word_ids:
                continue
            r = rng.random()
            if r >= self.word_prob:
                ids.extend(word_ids)
                selected.extend([False] * len(word_ids))
                continue
            r = r / self.word_prob if self.word_prob > 0 else 1.0  # uniform in [0, 1) again
            if r < self.mask_prob:
                ids.extend([self.tokenizer.mask_id] * len(word_ids))
            elif r < self.mask_prob + self.keep_prob:
                ids.extend(word_ids)
            else:
                if candidates is None:
                    candidates = self._random_ids()
                ids.extend(int(i) for i in rng.choice(candidates, size=len(word_ids)))
            selected.extend([True] * len(word_ids))
        return ids, selected


def noisy_source_ids(
    masker: WholeWordMasking, text: str, rng: np.random.Generator, row_prob: float = 0.5
) -> tuple[list[int], bool]:
    """Token ids of a row's source: whole-word masked with probability ``row_prob``, else clean.

    Returns ``(ids, noised)``.
    """
    if rng.random() < row_prob:
        return masker(text, rng)[0], True
    return masker.tokenizer.encode_ids(text), False
