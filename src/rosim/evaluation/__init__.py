"""STS evaluation: read labelled pair files, score cosines, Spearman x 100, whitening, tables, plots."""

from rosim.evaluation.evaluate import POOLINGS, StsResult, cosine_scores, encode_pairs, evaluate, parse_whiten
from rosim.evaluation.metrics import rankdata, spearman
from rosim.evaluation.report import format_table, plot_results, results_json
from rosim.evaluation.sts import StsPairs, read_sts
from rosim.evaluation.whitening import apply_whitening, fit_whitening

__all__ = [
    "POOLINGS", "StsPairs", "StsResult", "apply_whitening", "cosine_scores", "encode_pairs", "evaluate",
    "fit_whitening", "format_table", "parse_whiten", "plot_results", "rankdata", "read_sts", "results_json",
    "spearman",
]
