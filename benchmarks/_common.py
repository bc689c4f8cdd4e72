"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STSB_TEST = SHARED / "data" / "sts-zh" / "STS-B" / "test.tsv"
STSB_TRAIN = SHARED / "data" / "sts-zh" / "STS-B" / "train.tsv"


def sts_sentences(path: Path = STSB_TEST) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out += parts[:2]
    return out


def small_model(seed: int = 0, vocab_texts: list[str] | None = None):
    """A random-weight model shaped like RoFormer-Sim-small: 6 layers, 384 hidden, 6 heads, 12000 vocab."""
    from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
    from rosim.tokenization.tokenizer import CharTokenizer, build_vocab

    vocab = build_vocab(vocab_texts or sts_sentences(STSB_TRAIN), max_size=12000)
    filler = [f"[unused{i}]" for i in range(12000 - len(vocab))]
    tok = CharTokenizer(vocab + filler)
    torch.manual_seed(seed)
    model = RoFormerSim(RoFormerSimConfig(vocab_size=12000, hidden_size=384, num_layers=6, num_heads=6,
                                          intermediate_size=1536)).eval()
    return model, tok


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def emit(record: dict) -> None:
    print(json.dumps(record, ensure_ascii=False))


def generate_ids(sim, text: str, n: int, *, strategy: str, max_new: int, seed: int = 0,
                 top_p: float = 0.95) -> list[list[int]]:
    """Token ids of ``n`` samples for ``text``: the call ``similar`` makes, ids so tokens count exactly.
    Works on this checkout and on older ones (``PYTHONPATH=OLD/src``) whose private API differed."""
    if hasattr(sim, "_sampling_settings"):
        settings = sim._sampling_settings(n, top_p, None, 1.0, max_new, seed, strategy, 1 << 20)
        return sim._generate_ids(sim._prepare_sources(sim._source_ids([text]), None), n, settings)
    return sim._generate_ids([text], n, strategy=strategy, top_p=top_p, top_k=None, temperature=1.0,
                             max_new=max_new, mask_idxs=None, seed=seed)
