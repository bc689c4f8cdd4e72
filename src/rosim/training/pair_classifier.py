"""Using the result of supervised phase 1: the encoder and its pair head as a classifier."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rosim.errors import InputError
from rosim.modeling.model import RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer
from rosim.training.labelled import TASK_CLASSES, TASKS
from rosim.training.pair_head import HEAD_FILE, PairHead, encode_pairs_batch


def load_pair_classifier(directory: str | os.PathLike, *, device: str = "cpu") -> tuple[RoFormerSim, CharTokenizer, PairHead]:
    """The phase-1 model, its tokenizer and its pair head (``pair_head.safetensors``)."""
    from rosim.checkpoints.io import load_checkpoint

    model, tokenizer, _ = load_checkpoint(directory, map_location=device)
    if not (Path(directory) / HEAD_FILE).is_file():
        from rosim.errors import CheckpointError

        raise CheckpointError(f"{directory} has no {HEAD_FILE}: it is not the output of supervised training")
    head = PairHead.load(Path(directory) / HEAD_FILE, model.config.hidden_size).to(device).eval()
    return model, tokenizer, head


@torch.no_grad()
def predict_proba(model: RoFormerSim, tokenizer: CharTokenizer, head: PairHead, texts_a: Sequence[str],
                  texts_b: Sequence[str], *, task: str = "binary", maxlen: int = 64, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of the head: ``(N, 2)`` [P(0), P(1)] for binary, ``(N, 3)`` for NLI
    (contradiction, entailment, neutral)."""
    if task not in TASKS:
        raise InputError(f"task must be 'binary' or 'nli', got {task!r}")
    if len(texts_a) != len(texts_b):
        raise InputError(f"got {len(texts_a)} texts_a but {len(texts_b)} texts_b")
    model.eval()
    classes = list(TASK_CLASSES[task])
    out = []
    for i in range(0, len(texts_a), batch_size):
        pairs = [(a, b, 0, TASKS.index(task)) for a, b in zip(texts_a[i:i + batch_size], texts_b[i:i + batch_size],
                                                              strict=True)]
        batch = encode_pairs_batch(tokenizer, pairs, maxlen)
        enc = batch.encoding.to(model.device)
        pooled = model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled
        logits = head(pooled[0::2], pooled[1::2]).float()[:, classes]
        out.append(torch.softmax(logits, -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(classes)), np.float32)
