"""The model embedded in the package: loads strictly, is the documented size, and works (a broken
or swapped package fails here, not in a user's first command)."""

from pathlib import Path

import numpy as np
import pytest

from rosim.cli import main
from rosim.evaluation.metrics import spearman
from rosim.inference.sim_model import DEFAULT_MODEL_DIR, SimModel

STSB_VALID = Path(__file__).resolve().parents[3] / "shared" / "data" / "sts-zh" / "STS-B" / "valid.tsv"


@pytest.fixture(scope="module")
def model():
    return SimModel.default()


def test_size_and_config(model):
    cfg = model.model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (6, 384, 6)
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 40 * 2**20
    assert model.model.pooler is not None and model.name == "rosim-default"


def test_vectors_rank_paraphrases_above_unrelated(model):
    v = model.encode(["广州和深圳哪个好？", "深圳和广州哪个更好？", "我今天中午吃了一碗面条。"])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.05


@pytest.mark.skipif(not STSB_VALID.is_file(), reason="../shared/data not present")
def test_stsb_valid_spearman_floor(model):
    rows = [line.split("\t") for line in STSB_VALID.read_text(encoding="utf-8").splitlines()[:400]]
    a, b = model.encode([r[0] for r in rows]), model.encode([r[1] for r in rows])
    score = 100 * spearman((a * b).sum(1), np.array([float(r[2]) for r in rows]))
    assert score > 45, score  # the packaged model scores ~58 on the whole valid split


def test_similar_generates_new_sentences_and_cli(model, capsys):
    out = model.similar("今天天气怎么样？", n=32, k=5, seed=0)
    assert out and all(text != "今天天气怎么样？" for text, _ in out)
    assert all(-1 <= score <= 1 for _, score in out)
    assert main(["similar", "广州和深圳哪个好？", "-n", "16", "-k", "3"]) in (0, None)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 for line in lines)
