"""`SimModel`: one object that encodes, compares, generates and ranks similar sentences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from rosim import limits
from rosim.errors import CheckpointError, InputError
from rosim.inference import common
from rosim.inference.common import POOLINGS, Pooling, check_not_blank
from rosim.inference.common import check_texts as _check_texts
from rosim.inference.common import progress as _progress
from rosim.inference.decoding import TokenSampler, banned_token_ids, seeded_generator, tokens_until_end
from rosim.inference.sampling import check_sampling_args
from rosim.modeling.model import KVCache, RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer

DEFAULT_MIN_FLUENCY: float | None = -1.5  # nats per token; chosen on a panel (benchmarks/fluency_guard.py)

# One set of defaults and bounds for Python, the CLI and HTTP (the server's schemas read these).
DEFAULT_N = 100             # candidates sampled per input (RoFormer-Sim's examples)
DEFAULT_K = 20              # results kept per input
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 64  # tokens generated per candidate; input truncation is ``SimModel.max_length``
DEFAULT_MAX_ROWS = 512      # candidate rows decoded together: bounds the key/value cache's memory
# bounds: rosim.limits (MAX_N candidates per input, MAX_GEN_LENGTH new tokens, MAX_SEED)


class Candidate(NamedTuple):
    """One ranked result of :meth:`SimModel.similar` (unpacks as ``text, score``)."""

    text: str
    score: float


def repeats_more_than_source(source: str, candidate: str) -> bool:
    """True when a two-character word-ish unit occurs at least twice in ``candidate`` and more
    often than in ``source`` ("广州哪个广州和深圳最好" for "广州和深圳哪个好"): the degenerate
    repetition that a generator assigns high probability to, so its own log-probability misses it.
    """
    def counts(text: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for a, b in zip(text, text[1:], strict=False):
            if a.isalnum() and b.isalnum():
                out[a + b] = out.get(a + b, 0) + 1
        return out

    src = counts(source.lower())
    return any(c >= 2 and c > src.get(g, 0) for g, c in counts(candidate.lower()).items())

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


class SimModel:
    """A RoFormer-Sim model with its tokenizer: ``encode``, ``similarity``, ``generate``, ``similar``.

    Texts longer than ``max_length`` tokens (default 64, as RoFormer-Sim was trained) are truncated
    to their first ``max_length - 2`` tokens; empty or whitespace-only texts are rejected.
    """

    def __init__(self, model: RoFormerSim, tokenizer: CharTokenizer, *, max_length: int = 64,
                 device: str | torch.device | None = None, name: str | None = None):
        if len(tokenizer) != model.config.vocab_size:
            raise InputError(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is {model.config.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = min(max_length, model.config.max_position)
        self.name = name or "unnamed"
        if device is not None:
            self.model.to(device)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                        max_length: int = 64) -> SimModel:
        from rosim.checkpoints.io import load_checkpoint

        model, tokenizer, _ = load_checkpoint(directory)
        return cls(model, tokenizer, max_length=max_length, device=device, name=str(Path(directory).resolve()))

    @classmethod
    def default(cls, **kwargs) -> SimModel:
        """The small model embedded in the package."""
        if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
            raise CheckpointError(
                "no embedded default model in this installation; pass --model DIR with a rosim checkpoint "
                "(convert one with `rosim convert SRC DST --from hf|bert4keras|bert`, or train one with `rosim train`)"
            )
        model = cls.from_pretrained(DEFAULT_MODEL_DIR, **kwargs)
        model.name = "rosim-default"
        return model

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None, **kwargs) -> SimModel:
        """``from_pretrained(directory)`` or the embedded default model when ``directory`` is None."""
        return cls.default(**kwargs) if directory is None else cls.from_pretrained(directory, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from rosim.checkpoints.io import save_checkpoint

        return save_checkpoint(directory, self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def identity(self) -> dict:
        """What identifies the encoder (stored beside indexes so a different model is refused).

        ``weights`` hashes every tensor (:func:`~rosim.checkpoints.io.weights_digest`, ~0.1 s for a
        small model, computed once); ``fingerprint`` is the older, partial hash, kept so that indexes
        built before ``weights`` existed are still checked.
        """
        import hashlib

        from rosim.checkpoints.io import weights_digest

        state = self.model.state_dict()
        key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())  # changes when weights do
        if getattr(self, "_identity_key", None) != key:
            h = hashlib.sha256()
            for k, v in sorted(state.items()):
                if k.startswith(("pooler", "embeddings.word")):
                    h.update(k.encode())
                    h.update(v.detach().cpu().float().numpy().tobytes()[:65536])
            self._identity = {"fingerprint": h.hexdigest()[:16], "weights": weights_digest(state)[:32]}
            self._identity_key = key
        return {"name": self.name, **self._identity, "dim": self.model.config.hidden_size,
                "max_length": self.max_length}

    # ------------------------------------------------------------------ encoding
    def _source_ids(self, texts: list[str]) -> list[list[int]]:
        check_not_blank(texts)
        return self.tokenizer.encode_batch_ids(texts)

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64, normalize: bool = True,
               pooling: Pooling = "pooler", show_progress_bar: bool | None = None,
               convert_to: Literal["numpy", "torch"] = "numpy"):
        """Sentence vectors ``(n, H)`` (or ``(H,)`` for one string), in length-sorted batches.

        ``pooling``: "pooler" (the model's trained sentence vector: RoFormer-Sim's pooler, P2, or the
        mean for models whose ``config.sentence_pooling`` is "mean"), "cls" (last-layer [CLS], P1),
        "mean" (last-layer mean, P3) or "first-last-mean" (mean of first and last layers, P4).
        """
        items, single = _check_texts(texts)
        out = self._encode_ids(self._source_ids(items), batch_size=batch_size, normalize=normalize,
                               pooling=pooling, show_progress_bar=show_progress_bar)
        out = out[0] if single else out
        return out.numpy() if convert_to == "numpy" else out

    @torch.no_grad()
    def _encode_ids(self, ids: list[list[int]], *, batch_size: int = 64, normalize: bool = True,
                    pooling: Pooling = "pooler", show_progress_bar: bool | None = False) -> torch.Tensor:
        """Vectors of already tokenised texts (``[CLS]``/``[SEP]`` added here), float32 on the CPU."""
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooler" and not self.model.has_sentence_vector:
            raise InputError("this model has no pooler; use pooling='cls' or 'mean'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.model.config.hidden_size)
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in _progress(batches, len(batches), show_progress_bar, "encode"):
            enc = self.tokenizer.pad([self.tokenizer.build_inputs(ids[i], None, self.max_length) for i in batch])
            enc = enc.to(self.device)
            out[batch] = self._pool(enc, pooling).float().cpu()
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def _pool(self, enc, pooling: Pooling) -> torch.Tensor:
        res = self.model(enc.input_ids, enc.token_type_ids, enc.attention_mask,
                         output_hidden_states=pooling == "first-last-mean")
        if pooling == "pooler":
            return res.pooled
        if pooling == "cls":
            return res.last_hidden_state[:, 0]
        m = enc.attention_mask.unsqueeze(-1).to(res.last_hidden_state.dtype)
        h = res.last_hidden_state if pooling == "mean" else (res.hidden_states[1] + res.hidden_states[-1]) / 2
        return (h * m).sum(1) / m.sum(1)

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str], *, batch_size: int = 64):
        """Cosine similarity of every text of ``a`` with every text of ``b``; the shape follows the
        argument forms, never the lengths: ``(str, str)`` → float, ``(str, list)`` → ``(len(b),)``,
        ``(list, str)`` → ``(len(a),)``, ``(list, list)`` → ``(len(a), len(b))`` matrix.
        Texts shared by ``a`` and ``b`` are encoded once. For one score per pair of two equal-length
        lists use :meth:`similarity_pairwise`."""
        return common.similarity(self.encode, a, b, batch_size=batch_size)

    def similarity_pairwise(self, a: Sequence[str], b: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Cosine of ``a[i]`` with ``b[i]`` for two lists of equal length: a vector ``(len(a),)``."""
        return common.similarity_pairwise(self.encode, a, b, batch_size=batch_size)

    # ------------------------------------------------------------------ generation
    def generate(self, text: str | Sequence[str], n: int = 1, *, top_p: float | None = DEFAULT_TOP_P,
                 top_k: int | None = None, temperature: float = 1.0,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, mask_idxs: Sequence[int] | None = None,
                 seed: int | None = None, strategy: Literal["cache", "recompute"] = "cache",
                 max_rows: int = DEFAULT_MAX_ROWS) -> list[str] | list[list[str]]:
        """Sample ``n`` continuations per text in UniLM fashion.

        Each source ``[CLS] text [SEP]`` (segment 0, truncated to ``max_length``) is encoded once;
        its ``n`` targets (segment 1) are decoded together with the key/value cache and each stops
        at ``[SEP]`` or after ``max_new_tokens``. Sources of similar length are decoded together,
        at most ``max_rows`` target rows at a time (memory stays bounded for any list or ``n``).
        ``mask_idxs`` replaces those source positions ([CLS] is 0) with [MASK].
        ``strategy="recompute"`` re-runs the whole sequence per token (as bert4keras does); it
        exists for checking and benchmarking. [PAD], [CLS], [MASK] and [UNK] are never sampled.
        """
        items, single = _check_texts(text)
        settings = self._sampling_settings(n, top_p, top_k, temperature, max_new_tokens, seed, strategy, max_rows)
        src = self._prepare_sources(self._source_ids(items), mask_idxs)
        texts: list[list[str]] = [[] for _ in items]
        for chunk, rows, _ in self._generate_chunks(src, settings):
            for j, i in enumerate(chunk):
                texts[i] = [self.tokenizer.decode(r) for r in rows[j * settings["n"]:(j + 1) * settings["n"]]]
        return texts[0] if single else texts

    def _sampling_settings(self, n, top_p, top_k, temperature, max_new_tokens, seed, strategy, max_rows,
                           k=None) -> dict:
        n, k, top_p, max_new, seed = limits.check_similar_options(n=n, k=k, top_p=top_p,
                                                                  max_new_tokens=max_new_tokens, seed=seed)
        check_sampling_args(top_p, top_k, temperature)
        if strategy not in ("cache", "recompute"):
            raise InputError(f"strategy must be 'cache' or 'recompute', got {strategy!r}")
        generator = seeded_generator(seed, self.device)
        return {"n": n, "k": k, "top_p": top_p, "top_k": top_k, "temperature": temperature, "max_new": max_new,
                "strategy": strategy, "max_rows": limits.check_int("max_rows", max_rows, 1, 1 << 20),
                "generator": generator}

    def _prepare_sources(self, ids: list[list[int]], mask_idxs) -> list[list[int]]:
        tok = self.tokenizer
        src = [tok.build_inputs(row, None, self.max_length)[0] for row in ids]
        if mask_idxs:
            for row in src:
                for p in mask_idxs:
                    if not 0 <= p < len(row):
                        raise InputError(f"mask index {p} is outside the source (length {len(row)} with [CLS] and [SEP])")
                    row[p] = tok.mask_id
        return src

    def _generate_chunks(self, src: list[list[int]], settings: dict, *, with_fluency: bool = False):
        """Yield ``(source indices, n rows of ids per source, their fluency or None)`` over
        length-sorted groups of sources holding at most ``max_rows`` rows (one source alone when
        ``n`` exceeds it, split into parts). See :meth:`_generate_ids` for ``with_fluency``."""
        n, max_rows = settings["n"], settings["max_rows"]
        per = max(1, max_rows // n)
        order = sorted(range(len(src)), key=lambda i: len(src[i]))
        for start in range(0, len(order), per):
            chunk = order[start:start + per]
            parts = [([src[i] for i in chunk], n)] if n <= max_rows else \
                [([src[chunk[0]]], min(max_rows, n - part)) for part in range(0, n, max_rows)]
            made = [self._generate_ids(s, m, settings, with_fluency=with_fluency) for s, m in parts]
            if not with_fluency:
                yield chunk, [r for rows in made for r in rows], None
            else:
                yield chunk, [r for rows, _ in made for r in rows], np.concatenate([f for _, f in made])

    @torch.no_grad()
    def _generate_ids(self, src: list[list[int]], n: int, settings: dict, *, with_fluency: bool = False):
        """``n`` sampled rows of target ids per source (without the final [SEP]).

        ``with_fluency`` also returns, per row, what :meth:`fluency` would give it: the mean
        log-probability of its sampled tokens and final [SEP] under the model's unfiltered logits,
        read off the decoding steps (the cached decoder's logits equal the teacher-forced ones to
        ~1e-5), so ranking needs no second pass over the candidates. Rows cut at ``max_new_tokens``
        (no [SEP] sampled) get NaN: their score includes a [SEP] that was never decoded.
        """
        model, tok, device = self.model, self.tokenizer, self.device
        max_new = settings["max_new"]
        if model.config.position == "absolute":
            max_new = min(max_new, model.config.max_position - max(len(s) for s in src))
        sampler = TokenSampler(top_p=settings["top_p"], top_k=settings["top_k"], temperature=settings["temperature"],
                               generator=settings["generator"], banned=banned_token_ids(tok, device))
        if settings["strategy"] == "recompute":
            rows = self._generate_recompute(src, n, max_new, sampler)
            return (rows, np.full(len(rows), np.nan)) if with_fluency else rows

        src_len = torch.tensor([len(s) for s in src], device=device).repeat_interleave(n)
        total = len(src) * n
        enc = tok.pad([(s, [0] * len(s)) for s in src]).to(device)
        res = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, use_cache=True)
        last = res.last_hidden_state[torch.arange(len(src), device=device), enc.attention_mask.sum(1) - 1]
        logits = model.lm_logits(last).repeat_interleave(n, dim=0)
        width = enc.input_ids.shape[1]
        cache = KVCache(res.past_key_values, capacity=width + max_new, repeat=n)
        key_mask = torch.ones(total, width + max_new, dtype=torch.long, device=device)
        key_mask[:, :width] = enc.attention_mask.repeat_interleave(n, dim=0)
        tokens = torch.full((total, max_new), -1, dtype=torch.long, device=device)  # -1: never generated
        segment = torch.ones(total, 1, dtype=torch.long, device=device)
        active = torch.arange(total, device=device)
        logp_sum = torch.zeros(total, dtype=torch.float64, device=device)
        for step in range(max_new):
            log_normalizer = torch.logsumexp(logits.float(), dim=-1) if with_fluency else None  # before banning
            sampled = sampler(logits)
            tokens[active, step] = sampled
            if with_fluency:
                logp_sum[active] += (logits.float().gather(1, sampled[:, None]).squeeze(1) - log_normalizer).double()
            keep = sampled != tok.sep_id
            n_keep = int(keep.sum())  # the one host sync per step: is anyone still decoding?
            if n_keep == 0 or step == max_new - 1:
                break
            if n_keep < len(active):  # drop finished rows from the batch and the cache
                still = keep.nonzero().squeeze(-1)
                active, sampled, key_mask = active[still], sampled[still], key_mask[still]
                cache.select(still)
            pos = (src_len[active] + step).unsqueeze(1)
            logits, cache = model.decode_step(sampled.unsqueeze(1), position_ids=pos, cache=cache,
                                              token_type_ids=segment[:len(active)],
                                              attention_mask=key_mask[:, :width + step + 1])
        out, ended = tokens_until_end(tokens, tok.sep_id)
        if not with_fluency:
            return out
        lengths = torch.tensor([len(r) + 1 for r in out], dtype=torch.float64, device=device)
        ended = torch.tensor(ended, device=device)
        return out, torch.where(ended, logp_sum / lengths, torch.nan).cpu().numpy()

    def _generate_recompute(self, src, n, max_new, sampler: TokenSampler) -> list[list[int]]:
        """Reference decoder: the whole [CLS] src [SEP] tgt sequence with the UniLM mask at every step."""
        model, tok, device = self.model, self.tokenizer, self.device
        rows = [s for s in src for _ in range(n)]
        out: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))
        for step in range(max_new):
            batch = tok.pad([(rows[r] + out[r], [0] * len(rows[r]) + [1] * len(out[r])) for r in active]).to(device)
            lengths = batch.attention_mask.sum(1) - 1
            res = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, mask="unilm")
            logits = model.lm_logits(res.last_hidden_state[torch.arange(len(active), device=device), lengths])
            sampled = sampler(logits).tolist()
            still = []
            for r, token in zip(active, sampled, strict=True):
                if token != tok.sep_id:
                    out[r].append(token)
                    still.append(r)
            active = still
            if not active or step == max_new - 1:
                break
        return out

    def fluency(self, sources: Sequence[str], targets: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Mean log-probability per target token (the final [SEP] included) under the generator:
        ``(1/T) Σ_t log p(y_t | source, y_<t)`` with the UniLM mask, teacher-forced, one value per pair.

        A fluent paraphrase scores near the generator's typical token entropy; broken text (repeated
        names, wrong words) contains tokens the model itself finds unlikely and scores lower.
        """
        if isinstance(sources, str) or isinstance(targets, str):
            raise InputError("fluency takes two lists of texts (one source per target)")
        if len(sources) != len(targets):
            raise InputError(f"fluency needs as many sources as targets, got {len(sources)} and {len(targets)}")
        tok = self.tokenizer
        return self._fluency_ids(tok.encode_batch_ids(list(sources)), tok.encode_batch_ids(list(targets)),
                                 batch_size=batch_size)

    @torch.no_grad()
    def _fluency_ids(self, src_ids: list[list[int]], tgt_ids: list[list[int]], *, batch_size: int = 64) -> np.ndarray:
        if self.model.lm_head is None:
            raise InputError("this model has no LM head (config.with_lm_head=False): it cannot score text")
        tok, out = self.tokenizer, np.empty(len(tgt_ids), dtype=np.float64)
        for s in range(0, len(tgt_ids), batch_size):
            rows = [tok.build_inputs(a, b, 2 * self.max_length) for a, b in
                    zip(src_ids[s:s + batch_size], tgt_ids[s:s + batch_size], strict=True)]
            enc = tok.pad(rows).to(self.device)
            hidden = self.model(enc.input_ids, enc.token_type_ids, enc.attention_mask, mask="unilm").last_hidden_state
            logp = torch.log_softmax(self.model.lm_logits(hidden[:, :-1]).float(), dim=-1)
            picked = logp.gather(-1, enc.input_ids[:, 1:, None]).squeeze(-1)
            target = (enc.token_type_ids[:, 1:].bool() & enc.attention_mask[:, 1:].bool()).float()
            out[s:s + len(rows)] = ((picked * target).sum(1) / target.sum(1)).cpu().numpy()
        return out

    # ------------------------------------------------------------------ generate then rank
    def similar(self, text: str | Sequence[str], n: int = DEFAULT_N, k: int | None = None, *,
                top_p: float | None = DEFAULT_TOP_P, top_k: int | None = None, temperature: float = 1.0,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, mask_idxs: Sequence[int] | None = None,
                seed: int | None = None, batch_size: int = 128, max_rows: int = DEFAULT_MAX_ROWS,
                min_fluency: float | None = DEFAULT_MIN_FLUENCY,
                show_progress_bar: bool | None = None) -> list[Candidate] | list[list[Candidate]]:
        """Generate ``n`` candidates, de-duplicate, drop copies of the input, rank by cosine, keep ``k``.

        Each input is tokenised once; candidates are encoded and scored from the ids the generator
        produced (never re-tokenised). A list runs in length-sorted groups of at most ``max_rows``
        candidate rows (memory stays bounded; a progress bar shows on a terminal).

        Fluency guard: candidates whose mean per-token log-probability under the generator
        (:meth:`fluency`) is below ``min_fluency``, or that repeat a two-character unit more often
        than the input does (:func:`repeats_more_than_source`), are ranked after every candidate
        that passes, so they only fill places that no passing candidate can (``None`` turns the
        guard off).
        ``k`` defaults to ``DEFAULT_K`` (20) or ``n`` when that is smaller.
        Returns a list of :class:`Candidate` ``(text, score)`` for one text, a list of such lists
        for several texts. Fewer than ``k`` come back when fewer distinct candidates were generated.
        """
        items, single = _check_texts(text)
        settings = self._sampling_settings(n, top_p, top_k, temperature, max_new_tokens, seed, "cache", max_rows, k)
        k = min(DEFAULT_K, settings["n"]) if settings["k"] is None else settings["k"]
        ids = self._source_ids(items)
        src = self._prepare_sources(ids, mask_idxs)
        results: list[list[Candidate]] = [[] for _ in items]
        bar = common.progress_bar(len(items), show_progress_bar, "similar")
        # fluency read off the decoding steps, unless the generator saw a masked source
        with_fluency = min_fluency is not None and not mask_idxs
        for chunk, rows, fluency in self._generate_chunks(src, settings, with_fluency=with_fluency):
            ranked = self._rank(chunk, [ids[i] for i in chunk], [items[i] for i in chunk], rows,
                                settings["n"], k, batch_size, min_fluency, fluency)
            for i, found in zip(chunk, ranked, strict=True):
                results[i] = found
            bar.update(len(chunk))
        bar.close()
        return results[0] if single else results

    def _rank(self, chunk, src_ids, texts, rows, n, k, batch_size, min_fluency,
              row_fluency: np.ndarray | None = None) -> list[list[Candidate]]:
        """De-duplicate each source's ``n`` rows, score them against it and keep the best ``k``.
        ``row_fluency``: each row's fluency from the generator (NaN: compute it here)."""
        tok = self.tokenizer
        cand_text: list[list[str]] = []
        cand_ids: list[list[int]] = []
        owner: list[int] = []
        cand_row: list[int] = []
        for j, source in enumerate(texts):
            seen = {source, tok.decode(src_ids[j])}
            cand_text.append([])
            for r_index in range(j * n, (j + 1) * n):
                r = rows[r_index]
                t = tok.decode(r).strip()
                if t and t not in seen:
                    seen.add(t)
                    cand_text[j].append(t)
                    cand_ids.append(r)
                    owner.append(j)
                    cand_row.append(r_index)
        if not cand_ids:
            return [[] for _ in chunk]
        vecs = self._encode_ids(src_ids + cand_ids, batch_size=batch_size).numpy()
        passes = np.ones(len(cand_ids), dtype=bool)
        if min_fluency is not None:
            fluency = np.full(len(cand_ids), np.nan) if row_fluency is None else row_fluency[cand_row]
            todo = np.flatnonzero(np.isnan(fluency))
            if len(todo):
                fluency[todo] = self._fluency_ids([src_ids[owner[i]] for i in todo], [cand_ids[i] for i in todo],
                                                  batch_size=batch_size)
            passes = fluency >= min_fluency
            flat = [t for c in cand_text for t in c]
            passes &= np.array([not repeats_more_than_source(texts[j], t) for j, t in zip(owner, flat, strict=True)])
        out, offset = [], len(texts)
        for j, cands in enumerate(cand_text):
            scores = vecs[offset:offset + len(cands)] @ vecs[j]
            ok = passes[offset - len(texts):offset - len(texts) + len(cands)]
            offset += len(cands)
            order = np.lexsort((-scores, ~ok))[:k]  # fluent first, then by cosine
            out.append([Candidate(cands[i], float(scores[i])) for i in order])
        return out
