"""Presenting STS results: a text table, a JSON object and a PNG of cosine distributions by label."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from rosim.errors import InputError
from rosim.evaluation.evaluate import StsResult
from rosim.textio import atomic_write


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _configs(results: Sequence[StsResult]) -> list[tuple[str | None, str]]:
    return list(dict.fromkeys((r.pooling, r.whiten) for r in results))


def _pooling_label(p: str | None) -> str:
    return "-" if p is None else p


def format_table(results: Sequence[StsResult]) -> str:
    """A plain-text table of Spearman x 100.

    One setting: a row per file with its number of pairs. Several settings: a grid in the layout of
    the reference tables, a row per pooling, a column per file, each cell ``a/b/c`` over the
    whitening settings in the order given.
    """
    if not results:
        raise InputError("no results to report")
    configs = _configs(results)
    model = results[0].model
    files = list(dict.fromkeys(r.file for r in results))
    names = {r.file: r.name for r in results}
    if len(set(names.values())) < len(names):  # ambiguous short names: use the paths
        names = {f: f for f in files}
    pairs = {r.file: r.pairs for r in results}
    lines = []
    if len(configs) == 1:
        pooling, whiten = configs[0]
        lines.append(f"model: {model} | pooling: {_pooling_label(pooling)} | whitening: {whiten} | Spearman x 100")
        w = max(len("file"), *(len(f) for f in files))
        lines.append(f"{'file':<{w}}  {'pairs':>7}  {'spearman':>8}")
        lines.append(f"{'-' * w}  {'-' * 7}  {'-' * 8}")
        for r in results:
            lines.append(f"{r.file:<{w}}  {r.pairs:>7}  {_fmt(r.spearman):>8}")
        if len(results) > 1:
            finite = [r for r in results if not math.isnan(r.spearman)]
            if finite:
                avg = sum(r.spearman for r in finite) / len(finite)
                lines.append(f"{'mean over files':<{w}}  {'':>7}  {_fmt(avg):>8}")
        return "\n".join(lines)

    poolings = list(dict.fromkeys(p for p, _ in configs))
    whitens = list(dict.fromkeys(w for _, w in configs))
    cell = {(r.file, r.pooling, r.whiten): r.spearman for r in results}
    lines.append(f"model: {model} | Spearman x 100 | cells: whitening {' / '.join(whitens)}")
    rows = [["pooling", *(names[f] for f in files)]]
    for p in poolings:
        rows.append([_pooling_label(p), *("/".join(_fmt(cell.get((f, p, w), float("nan"))) for w in whitens)
                                          for f in files)])
    rows.append(["pairs", *(str(pairs[f]) for f in files)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_json(results: Sequence[StsResult]) -> dict:
    """``{"results": [{"file", "spearman", "pairs", "pooling", "whiten", "model"}, ...]}``; an
    undefined Spearman (constant labels or cosines) is ``null``."""
    return {"results": [r.to_dict() for r in results]}


def _label_groups(labels: np.ndarray, cosines: np.ndarray, max_groups: int = 12):
    values = np.unique(labels)
    if len(values) <= max_groups:
        return [(f"{v:g}", cosines[labels == v]) for v in values]
    edges = np.linspace(labels.min(), labels.max(), 6)
    idx = np.clip(np.searchsorted(edges, labels, side="right") - 1, 0, 4)
    return [(f"{edges[i]:.3g}–{edges[i + 1]:.3g}", cosines[idx == i]) for i in range(5) if (idx == i).any()]


def plot_results(results: Sequence[StsResult], out: str | os.PathLike, *, max_panels: int = 24) -> str:
    """Write a PNG: per file (columns) and setting (rows), the distribution of cosines for each label.

    A model that separates the labels shows violins that climb from left to right; the Spearman of
    each panel is in its title. With more than ``max_panels`` panels only the first setting is drawn.
    Written atomically; returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise InputError("no results to plot")
    configs = _configs(results)
    files = list(dict.fromkeys(r.file for r in results))
    if len(configs) * len(files) > max_panels:
        configs = configs[:1]
    by_key = {(r.file, r.pooling, r.whiten): r for r in results}
    nrows, ncols = len(configs), len(files)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 0.6, 3.4 * nrows + 0.8), squeeze=False)
    for i, (pooling, whiten) in enumerate(configs):
        for j, f in enumerate(files):
            ax = axes[i][j]
            r = by_key.get((f, pooling, whiten))
            if r is None:
                ax.set_axis_off()
                continue
            groups = [(name, c) for name, c in _label_groups(r.labels, r.cosines) if len(c)]
            data = [c for _, c in groups]
            positions = np.arange(1, len(groups) + 1)
            if all(len(c) > 1 and np.ptp(c) > 0 for c in data):
                parts = ax.violinplot(data, positions=positions, showextrema=False, widths=0.85)
                for body in parts["bodies"]:
                    body.set_facecolor("#4C72B0")
                    body.set_alpha(0.45)
            ax.boxplot(data, positions=positions, widths=0.18, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": "white", "linewidth": 0.8}, medianprops={"color": "#C44E52"},
                       whiskerprops={"linewidth": 0.8}, capprops={"linewidth": 0.8})
            means = [float(np.mean(c)) for c in data]
            ax.plot(positions, means, "o-", color="#DD8452", markersize=3, linewidth=1, label="mean")
            ax.set_xticks(positions, [f"{name}\n{len(c)}" for name, c in groups], fontsize=7)
            ax.set_title(f"{r.name}\nSpearman×100 = {_fmt(r.spearman)}   ({r.pairs} pairs)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"cosine\npooling {_pooling_label(pooling)}, whitening {whiten}", fontsize=8)
            if i == nrows - 1:
                ax.set_xlabel("label (pairs)", fontsize=8)
    fig.suptitle(f"Cosine similarity by gold label — {results[0].model}", fontsize=10)
    fig.tight_layout()
    with atomic_write(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return str(out)
