"""Each pooling against a direct computation from the model's outputs; Spearman of the whole path."""

import numpy as np
import pytest
import scipy.stats
import torch

from rosim.errors import InputError
from rosim.evaluation import encode_pairs, evaluate, format_table, plot_results, read_sts, results_json
from rosim.inference.sim_model import SimModel
from tests.helpers import SENTENCES, tiny_model

PAIRS = [(SENTENCES[i], SENTENCES[(i * 3 + 1) % len(SENTENCES)], float(i % 4)) for i in range(len(SENTENCES))]


@pytest.fixture(scope="module")
def sim():
    model, tok = tiny_model(seed=3)
    return SimModel(model, tok, name="tiny")


@pytest.fixture
def pair_file(tmp_path):
    p = tmp_path / "DEV" / "pairs.tsv"
    p.parent.mkdir()
    p.write_text("".join(f"{a}\t{b}\t{y:g}\n" for a, b, y in PAIRS), encoding="utf-8")
    return p


@torch.no_grad()
def direct_vector(sim, text, pooling):
    """One sentence, no padding: [CLS] text [SEP], segment 0, straight from the model's outputs."""
    ids = [sim.tokenizer.cls_id, *sim.tokenizer.encode_ids(text), sim.tokenizer.sep_id]
    out = sim.model(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long), output_hidden_states=True)
    if pooling == "pooler":
        return out.pooled[0]
    if pooling == "cls":
        return out.last_hidden_state[0, 0]
    if pooling == "mean":
        return out.last_hidden_state[0].mean(0)
    first_layer, last_layer = out.hidden_states[1][0], out.hidden_states[-1][0]  # [0] is the embeddings
    return ((first_layer + last_layer) / 2).mean(0)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean", "first-last-mean"])
def test_each_pooling_matches_direct_computation(sim, pair_file, pooling):
    data = read_sts(pair_file)
    va, vb = encode_pairs(sim, data, pooling=pooling, batch_size=4)
    ref_a = np.stack([direct_vector(sim, t, pooling).numpy() for t in data.texts_a])
    ref_b = np.stack([direct_vector(sim, t, pooling).numpy() for t in data.texts_b])
    np.testing.assert_allclose(va, ref_a, atol=1e-5)
    np.testing.assert_allclose(vb, ref_b, atol=1e-5)
    # the cosines are those of the direct vectors, and the number is scipy's Spearman of them x 100
    cos = (ref_a * ref_b).sum(1) / np.linalg.norm(ref_a, axis=1) / np.linalg.norm(ref_b, axis=1)
    [result] = evaluate(sim, [pair_file], poolings=[pooling])
    np.testing.assert_allclose(result.cosines, cos, atol=1e-5)
    expected = 100 * scipy.stats.spearmanr(result.cosines, data.labels).statistic
    assert result.spearman == pytest.approx(expected, abs=1e-9)
    assert result.pairs == len(PAIRS)


class FakeTeacher:
    """A non-rosim encoder: fixed pooling, so evaluate passes pooling=None."""

    name = "fake"
    poolings = (None,)

    def encode(self, texts, *, batch_size=64, normalize=True, show_progress_bar=None, pooling=None):
        assert pooling is None
        return np.array([[len(t), t.count("不") + 1.0, 1.0] for t in texts], dtype=np.float32)


def test_grid_of_settings_and_reports(pair_file, tmp_path, sim):
    results = evaluate(sim, [pair_file], poolings=["cls", "mean"], whitens=["none", "full", "4"])
    assert [(r.pooling, r.whiten) for r in results] == [
        ("cls", "none"), ("cls", "full"), ("cls", "4"), ("mean", "none"), ("mean", "full"), ("mean", "4")]
    table = format_table(results)
    assert "cells: whitening none / full / 4" in table and "DEV/pairs.tsv" in table
    assert table.count("/") >= 2 * 2
    js = results_json(results)
    assert set(js) == {"results"} and {"file", "spearman", "pairs"} <= set(js["results"][0])
    out = plot_results(results[:2], tmp_path / "plot.png")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DEV", "plot.png"]  # no temporary files left


def test_teacher_path_and_single_table(pair_file):
    [r] = evaluate(FakeTeacher(), [pair_file])  # a teacher's own pooling is the default
    assert r.pooling is None and r.model == "fake"
    assert "pooling: -" in format_table([r])


def test_evaluate_rejects_bad_settings(sim, pair_file):
    with pytest.raises(InputError, match="pooling must be one of"):
        evaluate(sim, [pair_file], poolings=["max"])
    with pytest.raises(InputError, match="no files"):
        evaluate(sim, [])
