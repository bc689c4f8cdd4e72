"""Character-level BERT-style tokenizer over a ``vocab.txt``, built on HF ``tokenizers``.

Every CJK character is its own token; text is lower-cased; punctuation is split; other runs of
letters and digits go through WordPiece (``##`` continuations), like bert4keras' ``Tokenizer`` and
``BertTokenizer`` on the "-char" RoFormer-Sim vocabularies.

Truncation (documented behaviour): a single text keeps its first ``max_length - 2`` tokens; a pair
is truncated longest-first to fit ``max_length`` in total (bert4keras ``truncate_sequences``).
An empty or blank text encodes to ``[CLS] [SEP]`` (documented behaviour: its vector is well defined).
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from rosim.errors import InputError

if TYPE_CHECKING:  # torch is imported where tensors are made, so torch-free users (ONNX) can tokenize
    import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Encoding:
    """A padded batch: ``input_ids``, ``token_type_ids`` and ``attention_mask`` as ``(B, L)`` long tensors."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> Encoding:
        return Encoding(self.input_ids.to(device), self.token_type_ids.to(device), self.attention_mask.to(device))


class CharTokenizer:
    """Tokenize Chinese text one character per token; pad, truncate and decode batches."""

    def __init__(self, vocab: Sequence[str] | dict[str, int], *, lowercase: bool = True):
        if not isinstance(vocab, dict):
            vocab = {token: i for i, token in enumerate(vocab)}
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise InputError(f"vocabulary lacks the special tokens {missing}; every vocab.txt needs {list(SPECIAL_TOKENS)}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise InputError("vocabulary ids must be 0..N-1 without gaps or duplicates")
        self.vocab = dict(vocab)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in SPECIAL_TOKENS)
        tok = _HFTokenizer(WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=200))  # bert4keras word_maxlen
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok = tok

    # ---------------------------------------------------------------- construction / files
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> CharTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 text: {exc}") from None
        tokens = [line.rstrip("\r\n") for line in lines]
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, c in Counter(tokens).items() if c > 1)
            raise InputError(f"{path}: token {dup!r} appears more than once")
        return cls(tokens, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text("".join(f"{self.inv_vocab[i]}\n" for i in range(len(self.vocab))), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.vocab)

    # ---------------------------------------------------------------- encoding
    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch_ids(self, texts: Sequence[str]) -> list[list[int]]:
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"expected strings, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def build_inputs(
        self, ids_a: list[int], ids_b: list[int] | None = None, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """[CLS] a [SEP] (b [SEP]) with segment ids, truncated to ``max_length`` tokens in total."""
        a, b = list(ids_a), None if ids_b is None else list(ids_b)
        if max_length is not None:
            budget = max_length - (2 if b is None else 3)
            if budget < (1 if b is None else 2):
                raise InputError(f"max_length={max_length} leaves no room for text")
            if b is None:
                a = a[:budget]
            else:
                while len(a) + len(b) > budget:  # longest first
                    if len(a) >= len(b):
                        a.pop()
                    else:
                        b.pop()
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def pad(self, rows: Sequence[tuple[list[int], list[int]]], pad_to: int | None = None) -> Encoding:
        """Right-pad (ids, segment) rows into an :class:`Encoding`."""
        import torch

        if not rows:
            raise InputError("nothing to pad: empty batch")
        length = max(len(ids) for ids, _ in rows) if pad_to is None else pad_to
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            token_type_ids[i, :n] = torch.tensor(types)
            attention_mask[i, :n] = 1
        return Encoding(input_ids, token_type_ids, attention_mask)

    def __call__(
        self, texts: str | Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int | None = 64
    ) -> Encoding:
        """Encode one text or a batch (optionally paired with ``pairs``), padded to the longest row."""
        if isinstance(texts, str):
            texts = [texts]
            pairs = None if pairs is None else [pairs] if isinstance(pairs, str) else pairs
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"got {len(texts)} texts but {len(pairs)} pair texts")
        ids_a = self.encode_batch_ids(texts)
        ids_b = self.encode_batch_ids(pairs) if pairs is not None else [None] * len(ids_a)
        return self.pad([self.build_inputs(a, b, max_length) for a, b in zip(ids_a, ids_b, strict=True)])

    # ---------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids back to text: CJK characters and punctuation join without spaces, words get one space."""
        out: list[str] = []
        specials = set(SPECIAL_TOKENS)
        for i in ids:
            token = self.inv_vocab.get(int(i), "[UNK]")
            if skip_special and token in specials and token != "[UNK]":
                continue
            if token.startswith("##") and len(token) > 2:
                if out:
                    out[-1] += token[2:]
                    continue
                token = token[2:]
            out.append(token)
        text = ""
        for token in out:
            if text and _needs_space(text[-1], token[0]):
                text += " "
            text += token
        return text


def _needs_space(prev: str, nxt: str) -> bool:
    def wordish(ch: str) -> bool:
        return ch.isascii() and ch.isalnum() or (ch == "]")  # "[UNK]" counts as a word

    return wordish(prev) and (wordish(nxt) or nxt == "[")


# ---------------------------------------------------------------- building a vocabulary
def build_vocab(
    texts: Iterable[str], *, max_size: int = 12000, min_count: int = 1, lowercase: bool = True
) -> list[str]:
    """Build a char-level vocabulary from a corpus: special tokens, then the most frequent tokens.

    CJK characters and punctuation become single tokens; ASCII letters and digits are kept as single
    characters and their ``##`` continuations, plus the most frequent whole ASCII words, so that any
    ASCII text tokenizes without [UNK].
    """
    ascii_base = list("0123456789abcdefghijklmnopqrstuvwxyz")
    smallest = len(SPECIAL_TOKENS) + 2 * len(ascii_base)
    if max_size < smallest:
        raise InputError(
            f"max_size must be at least {smallest} (special tokens + ASCII letters/digits and their ## forms), got {max_size}"
        )
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    chars: Counter[str] = Counter()
    words: Counter[str] = Counter()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            if len(piece) == 1:
                chars[piece] += 1
            else:
                words[piece] += 1
                chars.update(piece)
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for c in ascii_base:  # always present: ASCII never becomes [UNK]
        for tok in (c, "##" + c):
            vocab.append(tok)
            seen.add(tok)
    ranked = [c for c, n in chars.most_common() if n >= min_count and c not in seen]
    ranked_words = [w for w, n in words.most_common() if n >= max(min_count, 2) and w not in seen]
    # characters first (CJK is the point), then frequent whole words while room remains
    for tok in ranked + ranked_words:
        if len(vocab) >= max_size:
            break
        if tok in seen or unicodedata.category(tok[0]).startswith("C"):
            continue
        vocab.append(tok)
        seen.add(tok)
    return vocab
