"""`rosim classify fit|predict` and `rosim compare`: closed forms on sentence vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from rosim.errors import DataError, InputError

ModelOpt = Annotated[Path | None, typer.Option("--model", "-m",
                                               help="rosim checkpoint directory (default: the embedded model)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]


def register(app: typer.Typer) -> None:
    """Add ``classify`` (fit / predict) and ``compare`` to the rosim app."""
    classify = typer.Typer(name="classify", no_args_is_help=True,
                           help="Closed-form logistic/softmax regression on sentence vectors (no training loop).")
    classify.command("fit")(fit)
    classify.command("predict")(predict)
    app.add_typer(classify, name="classify")
    app.command("compare")(compare)


# --------------------------------------------------------------------------- encoding


def _load_encoder(model: Path | None):
    """The rosim model that turns texts into vectors (imported lazily; tests replace this)."""
    from rosim.inference.sim_model import SimModel

    return SimModel.load(model)


def _encode(encoder, texts: list[str], *, normalize: bool, quiet: bool) -> np.ndarray:
    vectors = encoder.encode(texts, batch_size=64, normalize=normalize,
                             show_progress_bar=False if quiet else None)
    return np.asarray(vectors, dtype=np.float64)


def _identity(encoder, model: Path | None) -> dict:
    ident = dict(encoder.identity()) if hasattr(encoder, "identity") else {}
    ident["path"] = None if model is None else str(Path(model).resolve())
    return ident


def _parse_shrinkage(text: str) -> float | str | None:
    t = text.strip().lower()
    if t in ("none", "no", ""):
        return None
    if t == "auto":
        return "auto"
    try:
        value = float(t)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise InputError(f"--shrinkage must be 'none', 'auto' or a number in [0, 1], got {text!r}")
    return value or None


def _read_texts(path: Path) -> list[tuple[int, str]]:
    from rosim.textio import iter_lines

    lines = list(iter_lines(path))
    if not lines:
        raise InputError(f"{path} contains no texts")
    return lines


# --------------------------------------------------------------------------- classify


def fit(
    train: Annotated[Path, typer.Argument(metavar="TRAIN.tsv", help="UTF-8 file of 'text<TAB>label' lines")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="CLF_DIR", help="directory to write the classifier to")],
    model: ModelOpt = None,
    shrinkage: Annotated[str, typer.Option(help="covariance shrinkage: 'auto' (Ledoit-Wolf; ~0 when texts "
                                                "far outnumber dimensions), 'none' or a number in [0, 1]")] = "auto",
    whiten: Annotated[bool, typer.Option("--whiten/--no-whiten", help="estimate in whitened coordinates")] = True,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                                            help="L2-normalise the sentence vectors first")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a closed-form classifier on the sentence vectors of TRAIN's texts; save it to -o DIR."""
    from rosim.closed_forms import GaussianLogisticRegression

    texts, labels = [], []
    for number, line in _read_texts(train):
        text, sep, label = line.rpartition("\t")
        if not sep:
            raise DataError(f"{train}:{number}: expected 'text<TAB>label', found no tab")
        if not text.strip() or not label.strip():
            raise DataError(f"{train}:{number}: empty {'text' if not text.strip() else 'label'}")
        texts.append(text)
        labels.append(label.strip())
    if len(set(labels)) < 2:
        raise InputError(f"{train}: all {len(labels)} lines have the label {labels[0]!r}; "
                         "a classifier needs at least 2 labels")
    clf = GaussianLogisticRegression(shrinkage=_parse_shrinkage(shrinkage), whiten=whiten)
    encoder = _load_encoder(model)
    X = _encode(encoder, texts, normalize=normalize, quiet=quiet)
    clf.fit(X, np.asarray(labels))
    accuracy = float((clf.predict(X) == np.asarray(labels)).mean())
    clf.save(output, metadata={"encoder": _identity(encoder, model), "normalize": normalize,
                               "train_file": str(train), "n_train": len(texts),
                               "train_accuracy": accuracy})
    counts = {c: int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}
    shown = ", ".join(f"{c}: {n}" for c, n in list(counts.items())[:10]) + (", ..." if len(counts) > 10 else "")
    typer.echo(f"fitted {len(texts)} texts, {len(counts)} labels "
               f"({shown}), {X.shape[1]}-d vectors; "
               f"training accuracy {100 * accuracy:.2f}%; saved to {output}")


def predict(
    classifier: Annotated[Path, typer.Argument(metavar="CLF_DIR", help="directory written by `rosim classify fit`")],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="UTF-8 file, one text per line (empty lines are skipped)")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="encoder to use instead of the one "
                                                                     "recorded at fit time")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line with probabilities")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Print the predicted label of every line of FILE."""
    from rosim.closed_forms import GaussianLogisticRegression

    clf = GaussianLogisticRegression.load(classifier)
    meta: dict[str, Any] = getattr(clf, "metadata_", {}) or {}
    recorded = (meta.get("encoder") or {})
    if model is None and recorded.get("path"):
        model = Path(recorded["path"])
    lines = _read_texts(file)
    encoder = _load_encoder(model)
    ident = _identity(encoder, model)
    if recorded.get("fingerprint") and ident.get("fingerprint") and \
            recorded["fingerprint"] != ident["fingerprint"]:
        raise InputError(f"{classifier} was fitted on vectors of {recorded.get('name') or recorded.get('path')} "
                         f"(fingerprint {recorded['fingerprint']}), not of "
                         f"{ident.get('name') or ident.get('path')}; pass the same --model")
    X = _encode(encoder, [t for _, t in lines], normalize=bool(meta.get("normalize", False)), quiet=quiet)
    if X.shape[1] != clf.n_features_in_:
        raise InputError(f"the encoder gives {X.shape[1]}-d vectors but {classifier} expects "
                         f"{clf.n_features_in_}-d; pass the --model it was fitted with")
    proba = clf.predict_proba(X)
    best = proba.argmax(axis=1)
    for (number, text), row, j in zip(lines, proba, best, strict=True):
        label = str(clf.classes_[j])
        if as_json:
            typer.echo(json.dumps({"line": number, "text": text, "label": label,
                                   "probabilities": {str(c): round(float(p), 6)
                                                     for c, p in zip(clf.classes_, row, strict=True)}},
                                  ensure_ascii=False))
        else:
            typer.echo(label)


# --------------------------------------------------------------------------- compare


def compare(
    a: Annotated[Path, typer.Argument(metavar="A.txt", help="UTF-8 file, one text per line")],
    b: Annotated[Path, typer.Argument(metavar="B.txt", help="UTF-8 file, one text per line")],
    model: ModelOpt = None,
    shrinkage: Annotated[str, typer.Option(help="covariance shrinkage: 'auto' (Ledoit-Wolf), 'none' or "
                                                "a number in [0, 1]")] = "auto",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                                            help="L2-normalise the sentence vectors first")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a Gaussian to each corpus' sentence vectors and print KL, Bhattacharyya, Hellinger and W2."""
    from rosim.closed_forms import bhattacharyya, fit_gaussian, hellinger, kl, w2

    texts_a = [t for _, t in _read_texts(a)]
    texts_b = [t for _, t in _read_texts(b)]
    for path, texts in ((a, texts_a), (b, texts_b)):
        if len(texts) < 2:
            raise InputError(f"{path} has {len(texts)} text; a covariance needs at least 2")
    shrink = _parse_shrinkage(shrinkage)
    encoder = _load_encoder(model)
    xa = _encode(encoder, texts_a, normalize=normalize, quiet=quiet)
    xb = _encode(encoder, texts_b, normalize=normalize, quiet=quiet)
    pa = fit_gaussian(xa, shrinkage=shrink)
    pb = fit_gaussian(xb, shrinkage=shrink)
    result = {
        "a": str(a), "b": str(b), "n_a": len(texts_a), "n_b": len(texts_b), "dim": int(xa.shape[1]),
        "shrinkage": shrink, "normalize": normalize,
        "kl_a_b": kl(*pa, *pb), "kl_b_a": kl(*pb, *pa),
        "bhattacharyya": bhattacharyya(*pa, *pb), "hellinger": hellinger(*pa, *pb),
        "w2": w2(*pa, *pb), "w2_squared": w2(*pa, *pb, squared=True),
    }
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    typer.echo(f"A: {a} ({len(texts_a)} texts)   B: {b} ({len(texts_b)} texts)   "
               f"{result['dim']}-d vectors, shrinkage {shrink or 'none'}")
    rows = [("KL(A||B)", "kl_a_b"), ("KL(B||A)", "kl_b_a"), ("Bhattacharyya", "bhattacharyya"),
            ("Hellinger", "hellinger"), ("W2", "w2"), ("W2^2", "w2_squared")]
    for title, key in rows:
        typer.echo(f"{title:<14}{result[key]:.6g}")
