"""`SimModel`: one object that encodes, compares, generates and ranks similar sentences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rosim.errors import CheckpointError, InputError
from rosim.inference.sampling import check_sampling_args, filter_logits, sample, sample_top_p
from rosim.limits import text_problem
from rosim.modeling.model import KVCache, RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer

DEFAULT_MIN_FLUENCY: float | None = -1.5  # nats per token; chosen on a panel (benchmarks/fluency_guard.py)


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

Pooling = Literal["pooler", "cls", "mean", "first-last-mean"]
POOLINGS = ("pooler", "cls", "mean", "first-last-mean")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


def _progress(iterable, total: int, enabled: bool | None, desc: str):
    import sys

    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty() and total > 1
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def _check_texts(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    if not items:
        raise InputError("no texts given")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, expected str")
    return items, single


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
        for i, t in enumerate(texts):
            problem = text_problem(t)
            if problem is not None:
                raise InputError(f"text {i} {problem}")
        return self.tokenizer.encode_batch_ids(texts)

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64, normalize: bool = True,
               pooling: Pooling = "pooler", show_progress_bar: bool | None = None,
               convert_to: Literal["numpy", "torch"] = "numpy"):
        """Sentence vectors ``(n, H)`` (or ``(H,)`` for one string), in length-sorted batches.

        ``pooling``: "pooler" (the model's trained sentence vector: RoFormer-Sim's pooler, P2, or the
        mean for models whose ``config.sentence_pooling`` is "mean"), "cls" (last-layer [CLS], P1),
        "mean" (last-layer mean, P3) or "first-last-mean" (mean of first and last layers, P4).
        """
        items, single = _check_texts(texts)
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooler" and not self.model.has_sentence_vector:
            raise InputError("this model has no pooler; use pooling='cls' or 'mean'")
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        ids = self._source_ids(items)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.model.config.hidden_size)
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in _progress(batches, len(batches), show_progress_bar, "encode"):
            enc = self.tokenizer.pad([self.tokenizer.build_inputs(ids[i], None, self.max_length) for i in batch])
            enc = enc.to(self.device)
            out[batch] = self._pool(enc, pooling).float().cpu()
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        out = out[0] if single else out
        return out.numpy() if convert_to == "numpy" else out

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

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str], *, pairwise: bool | None = None,
                   batch_size: int = 64):
        """Cosine similarity. Two strings give a float; two equal-length lists give the pairwise
        cosines (``pairwise=True``, default when lengths match) or the full matrix (``pairwise=False``)."""
        a_items, a_single = _check_texts(a)
        b_items, b_single = _check_texts(b)
        va = self.encode(a_items, batch_size=batch_size)
        vb = self.encode(b_items, batch_size=batch_size)
        if a_single and b_single:
            return float(va[0] @ vb[0])
        if pairwise is None:
            pairwise = len(a_items) == len(b_items)
        if pairwise:
            if len(a_items) != len(b_items):
                raise InputError(f"pairwise similarity needs equal lengths, got {len(a_items)} and {len(b_items)}")
            return np.einsum("ij,ij->i", va, vb)
        return va @ vb.T

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, text: str | Sequence[str], n: int = 1, *, top_p: float | None = 0.95,
                 top_k: int | None = None, temperature: float = 1.0, max_length: int = 64,
                 mask_idxs: Sequence[int] | None = None, seed: int | None = None,
                 strategy: Literal["cache", "recompute"] = "cache") -> list[str] | list[list[str]]:
        """Sample ``n`` continuations per text in UniLM fashion, all in parallel.

        The source ``[CLS] text [SEP]`` (segment 0) is encoded once; the ``n`` targets (segment 1) are
        decoded together with the key/value cache and each stops at ``[SEP]`` or after ``max_length``
        tokens. ``mask_idxs`` replaces those source positions ([CLS] is 0) with [MASK].
        ``strategy="recompute"`` re-runs the whole sequence per token (as bert4keras does); it exists
        for checking and benchmarking. [PAD], [CLS], [MASK] and [UNK] are never sampled.
        """
        items, single = _check_texts(text)
        if not isinstance(n, int) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        if max_length <= 0:
            raise InputError(f"max_length must be positive, got {max_length}")
        check_sampling_args(top_p, top_k, temperature)
        rows = self._generate_ids(items, n, top_p=top_p, top_k=top_k, temperature=temperature,
                                  max_new=max_length, mask_idxs=mask_idxs, seed=seed, strategy=strategy)
        texts = [[self.tokenizer.decode(r) for r in rows[i * n:(i + 1) * n]] for i in range(len(items))]
        return texts[0] if single else texts

    def _prepare_sources(self, items: list[str], mask_idxs):
        tok = self.tokenizer
        src = [tok.build_inputs(ids, None, self.max_length)[0] for ids in self._source_ids(items)]
        if mask_idxs:
            for row in src:
                for p in mask_idxs:
                    if not 0 <= p < len(row):
                        raise InputError(f"mask index {p} is outside the source (length {len(row)} with [CLS] and [SEP])")
                    row[p] = tok.mask_id
        return src

    def _generate_ids(self, items, n, *, top_p, top_k, temperature, max_new, mask_idxs, seed, strategy):
        model, tok, device = self.model, self.tokenizer, self.device
        limit = model.config.max_position
        src = self._prepare_sources(items, mask_idxs)
        max_new = min(max_new, limit - max(len(s) for s in src)) if model.config.position == "absolute" else max_new
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        banned = torch.tensor([tok.pad_id, tok.cls_id, tok.mask_id, tok.unk_id], device=device)
        src_len = torch.tensor([len(s) for s in src], device=device).repeat_interleave(n)
        total = len(src) * n
        out: list[list[int]] = [[] for _ in range(total)]

        def pick(logits):
            logits = logits.float()
            logits[:, banned] = float("-inf")
            if top_p is not None and top_k is None:  # the common case: no full-vocabulary sort
                return sample_top_p(logits, top_p, temperature=temperature, generator=generator)
            return sample(filter_logits(logits, top_p=top_p, top_k=top_k, temperature=temperature), generator)

        if strategy == "recompute":
            return self._generate_recompute(src, n, max_new, pick, out)
        if strategy != "cache":
            raise InputError(f"strategy must be 'cache' or 'recompute', got {strategy!r}")

        enc = tok.pad([(s, [0] * len(s)) for s in src]).to(device)
        res = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, use_cache=True)
        last = res.last_hidden_state[torch.arange(len(src), device=device), enc.attention_mask.sum(1) - 1]
        logits = model.lm_logits(last).repeat_interleave(n, dim=0)
        width = enc.input_ids.shape[1]
        cache = KVCache(tuple((k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in res.past_key_values),
                        capacity=width + max_new)
        key_mask = torch.ones(total, width + max_new, dtype=torch.long, device=device)
        key_mask[:, :width] = enc.attention_mask.repeat_interleave(n, dim=0)
        tokens = torch.full((total, max_new), -1, dtype=torch.long, device=device)  # -1: never generated
        segment = torch.ones(total, 1, dtype=torch.long, device=device)
        active = torch.arange(total, device=device)
        for step in range(max_new):
            nxt = pick(logits)
            tokens[active, step] = nxt
            keep = nxt != tok.sep_id
            n_keep = int(keep.sum())  # the one host sync per step: is anyone still decoding?
            if n_keep == 0 or step == max_new - 1:
                break
            if n_keep < len(active):  # drop finished rows from the batch and the cache
                idx = keep.nonzero().squeeze(-1)
                active, nxt, key_mask = active[idx], nxt[idx], key_mask[idx]
                cache.select(idx)
            pos = (src_len[active] + step).unsqueeze(1)
            res = model(nxt.unsqueeze(1), segment[:len(active)], key_mask[:, :width + step + 1],
                        position_ids=pos, past_key_values=cache, use_cache=True, validate=False)
            logits = model.lm_logits(res.last_hidden_state[:, -1])
        for row, ids in enumerate(tokens.tolist()):
            for t in ids:
                if t == tok.sep_id or t < 0:
                    break
                out[row].append(t)
        return out

    def _generate_recompute(self, src, n, max_new, pick, out):
        """Reference decoder: the whole [CLS] src [SEP] tgt sequence with the UniLM mask at every step."""
        model, tok, device = self.model, self.tokenizer, self.device
        rows = [s for s in src for _ in range(n)]
        active = list(range(len(rows)))
        for step in range(max_new):
            batch = tok.pad([(rows[r] + out[r], [0] * len(rows[r]) + [1] * len(out[r])) for r in active]).to(device)
            lengths = batch.attention_mask.sum(1) - 1
            res = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, mask="unilm")
            logits = model.lm_logits(res.last_hidden_state[torch.arange(len(active), device=device), lengths])
            nxt = pick(logits).tolist()
            still = []
            for r, token in zip(active, nxt, strict=True):
                if token != tok.sep_id:
                    out[r].append(token)
                    still.append(r)
            active = still
            if not active or step == max_new - 1:
                break
        return out

    @torch.no_grad()
    def fluency(self, sources: Sequence[str], targets: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Mean log-probability per target token (the final [SEP] included) under the generator:
        ``(1/T) Σ_t log p(y_t | source, y_<t)`` with the UniLM mask, teacher-forced, one value per pair.

        A fluent paraphrase scores near the generator's typical token entropy; broken text (repeated
        names, wrong words) contains tokens the model itself finds unlikely and scores lower.
        """
        if len(sources) != len(targets):
            raise InputError(f"fluency needs as many sources as targets, got {len(sources)} and {len(targets)}")
        if self.model.lm_head is None:
            raise InputError("this model has no LM head (config.with_lm_head=False): it cannot score text")
        tok, out = self.tokenizer, np.empty(len(targets), dtype=np.float64)
        src_ids, tgt_ids = tok.encode_batch_ids(list(sources)), tok.encode_batch_ids(list(targets))
        for s in range(0, len(targets), batch_size):
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
    def similar(self, text: str | Sequence[str], n: int = 100, k: int = 20, *, top_p: float | None = 0.95,
                top_k: int | None = None, temperature: float = 1.0, max_length: int = 64,
                mask_idxs: Sequence[int] | None = None, seed: int | None = None,
                batch_size: int = 128, min_fluency: float | None = DEFAULT_MIN_FLUENCY):
        """Generate ``n`` candidates, de-duplicate, drop copies of the input, rank by cosine, keep ``k``.

        Fluency guard: candidates whose mean per-token log-probability under the generator
        (:meth:`fluency`) is below ``min_fluency``, or that repeat a two-character unit more often
        than the input does (:func:`repeats_more_than_source`), are ranked after every candidate
        that passes, so they only fill places that no passing candidate can (``None`` turns the
        guard off).
        Returns ``[(text, score), ...]`` for one text, a list of such lists for several texts.
        Fewer than ``k`` results come back when fewer distinct candidates were generated.
        """
        items, single = _check_texts(text)
        if not isinstance(k, int) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if isinstance(n, int) and k > n:
            raise InputError(f"k ({k}) cannot exceed n ({n}): only n candidates are generated")
        generated = self.generate(items, n, top_p=top_p, top_k=top_k, temperature=temperature,
                                  max_length=max_length, mask_idxs=mask_idxs, seed=seed)
        candidates = []
        for src, outs in zip(items, generated, strict=True):
            norm_src = self.tokenizer.decode(self.tokenizer.encode_ids(src))
            seen, keep = set(), []
            for o in outs:
                o = o.strip()
                if o and o not in seen and o != src and o != norm_src:
                    seen.add(o)
                    keep.append(o)
            candidates.append(keep)
        flat = [t for c in candidates for t in c]
        vecs = self.encode(items + flat, batch_size=batch_size) if flat else None
        passes = np.ones(len(flat), dtype=bool)
        if flat and min_fluency is not None:
            sources = [src for src, cands in zip(items, candidates, strict=True) for _ in cands]
            passes = self.fluency(sources, flat, batch_size=batch_size) >= min_fluency
            passes &= np.array([not repeats_more_than_source(a, b) for a, b in zip(sources, flat, strict=True)])
        results, offset = [], len(items)
        for i, cands in enumerate(candidates):
            if not cands:
                results.append([])
                continue
            scores = vecs[offset:offset + len(cands)] @ vecs[i]
            ok = passes[offset - len(items):offset - len(items) + len(cands)]
            offset += len(cands)
            order = np.lexsort((-scores, ~ok))[:k]  # fluent first, then by cosine
            results.append([(cands[j], float(scores[j])) for j in order])
        return results[0] if single else results
