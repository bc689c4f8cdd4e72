"""The vector index: brute-force agreement, persistence, model identity, damaged files, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from rosim.errors import DataError, InputError
from rosim.index import VectorIndex, default_nlist
from rosim.inference.sim_model import SimModel
from tests.helpers import SENTENCES, tiny_model


def clustered(n, dim=24, centers=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(db, queries, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ db.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


@pytest.fixture(scope="module")
def sim():
    model, tok = tiny_model(seed=0)
    return SimModel(model, tok, name="tiny-a")


def test_exact_search_equals_brute_force_cosine():
    db = clustered(500)
    queries = np.random.default_rng(1).normal(size=(20, 24)).astype(np.float32) * 3  # unnormalised queries
    index = VectorIndex(24)
    index.add([f"t{i}" for i in range(500)], db * 2.5)  # stored vectors are normalised on the way in
    scores, ids = index.search(queries, 7)
    ref_scores, ref_ids = brute_force(db, queries, 7)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.99  # only exact ties may swap
    np.testing.assert_allclose(index.vectors(), db, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_the_same_neighbours(kind):
    db, queries = clustered(1200), clustered(30, seed=5)
    index = VectorIndex(24, kind=kind)
    index.add([str(i) for i in range(1200)], db)
    _, ids = index.search(queries, 10)
    _, ref = brute_force(db, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref, strict=True)])
    assert recall > 0.9
    if kind == "ivf":
        assert index.nlist == default_nlist(1200) == 30 and index.is_trained


def test_k_is_clamped_and_validated():
    index = VectorIndex(24)
    index.add(["a", "b", "c"], clustered(3))
    scores, ids = index.search(clustered(2, seed=3), 10)
    assert ids.shape == (2, 3) and (np.diff(scores, axis=1) <= 1e-6).all()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="k must be a positive integer"):
            index.search(clustered(1), bad)
    with pytest.raises(InputError, match=r"shape \(n, 24\)"):
        index.search(np.ones((1, 5)), 1)
    with pytest.raises(InputError, match="all zeros"):
        index.add(["z"], np.zeros((1, 24)))


def test_empty_index_query_is_a_clear_error(sim):
    for kind in ("exact", "ivf", "hnsw"):
        with pytest.raises(InputError, match="index is empty"):
            VectorIndex(24, kind=kind).search(clustered(1), 3)
    with pytest.raises(InputError, match="index is empty"):
        VectorIndex(32, encoder_identity=sim.identity()).search_texts(sim, "今天天气不错")
    with pytest.raises(InputError, match="nothing to save"):
        VectorIndex(24).save("unused")


def test_build_from_file_streams_and_matches_direct_encoding(sim, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    index = VectorIndex.from_file(sim, corpus, batch_size=3, show_progress_bar=False)
    assert index.texts == SENTENCES and index.encoder_identity == sim.identity()
    streamed = VectorIndex.build(sim, iter(SENTENCES), show_progress_bar=False)
    streamed_small = VectorIndex(32, encoder_identity=sim.identity())
    streamed_small.add_texts(sim, iter(SENTENCES), chunk_size=3, show_progress_bar=False)
    np.testing.assert_allclose(index.vectors(), sim.encode(SENTENCES), atol=1e-5)
    np.testing.assert_allclose(streamed_small.vectors(), index.vectors(), atol=1e-5)
    np.testing.assert_allclose(streamed.vectors(), index.vectors(), atol=1e-5)
    hits = index.search_texts(sim, [SENTENCES[2], SENTENCES[5]], k=3)
    assert [h[0].text for h in hits] == [SENTENCES[2], SENTENCES[5]]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5) and hits[0][0].id == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="contains no texts"):
        VectorIndex.from_file(sim, empty)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    db = clustered(400)
    texts = [f"句子 {i}\t带制表符\n和换行" if i % 50 == 0 else f"s{i}" for i in range(400)]
    index = VectorIndex(24, kind=kind, encoder_identity={"name": "x", "fingerprint": "f", "dim": 24})
    index.add(texts, db)
    before = index.search(clustered(5, seed=9), 5)
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded.texts == texts and loaded.kind == kind and loaded.ntotal == 400
    assert loaded.nlist == index.nlist and loaded.encoder_identity == index.encoder_identity
    after = loaded.search(clustered(5, seed=9), 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    loaded.add(["new"], clustered(1, seed=11))  # loaded indexes can grow and be saved again
    loaded.save(tmp_path / "idx")
    assert VectorIndex.load(tmp_path / "idx").texts[-1] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary directories left


def test_model_mismatch_is_refused(sim, tmp_path):
    index = VectorIndex.build(sim, SENTENCES, show_progress_bar=False)
    index.save(tmp_path / "idx")
    model, tok = tiny_model(seed=1)
    other = SimModel(model, tok, name="tiny-b")
    with pytest.raises(InputError, match=r"built with 'tiny-a'.*'tiny-b'.*fingerprint.*rebuild"):
        VectorIndex.load(tmp_path / "idx", other)
    with pytest.raises(InputError, match="not comparable"):
        index.search_texts(other, "今天天气不错")
    with pytest.raises(InputError, match="not comparable"):
        index.add_texts(other, ["今天天气很好"])
    renamed = SimModel(sim.model, sim.tokenizer, name="same weights, other path")
    assert VectorIndex.load(tmp_path / "idx", renamed).ntotal == len(SENTENCES)


def test_a_change_deep_inside_the_encoder_is_refused(sim, tmp_path):
    """The identity hashes every weight: a model that differs only in one middle-layer tensor (the
    old fingerprint looked at the pooler and word embeddings only) is another model."""
    import copy

    import torch

    index = VectorIndex.build(sim, SENTENCES, show_progress_bar=False)
    index.save(tmp_path / "idx")
    model = copy.deepcopy(sim.model)
    with torch.no_grad():
        model.layers[1].intermediate.weight[3, 5] += 1e-3
    other = SimModel(model, sim.tokenizer, name=sim.name)
    assert other.identity()["fingerprint"] == sim.identity()["fingerprint"]
    with pytest.raises(InputError, match="weights"):
        VectorIndex.load(tmp_path / "idx", other)
    # the identity follows in-place changes of the same model object
    before = sim.identity()["weights"]
    with torch.no_grad():
        sim.model.layers[0].ffn_output.bias[0] += 1.0
    try:
        assert sim.identity()["weights"] != before
    finally:
        with torch.no_grad():
            sim.model.layers[0].ffn_output.bias[0] -= 1.0


@pytest.fixture
def saved(tmp_path):
    index = VectorIndex(24, kind="exact")
    index.add([f"t{i}" for i in range(50)], clustered(50))
    return index.save(tmp_path / "idx")


def test_truncated_index_is_reported(saved):
    path = saved / "vectors.faiss"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"vectors.faiss is truncated .* rebuild it"):
        VectorIndex.load(saved)


def test_corrupt_bytes_are_reported(saved):
    path = saved / "texts.jsonl"
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"texts.jsonl is corrupt \(its SHA-256"):
        VectorIndex.load(saved)


def test_unreadable_faiss_file_is_reported(saved):
    """Even when meta.json agrees with the damaged file, faiss' failure becomes a clear error."""
    path = saved / "vectors.faiss"
    path.write_bytes(b"not a faiss index at all" * 10)
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["vectors.faiss"] = {}
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not a readable faiss index"):
        VectorIndex.load(saved)


@pytest.mark.parametrize(("raw", "match"), [
    (b'"a"\n"b"\n', r"^t.jsonl holds 2 texts, meta.json says 3; fix$"),
    (b'"a"\n7\n"c"\n', r"^t.jsonl:2 is not a JSON string; fix$"),
    (b'"a"\n"b\n"c"\n', r"^t.jsonl:2 is not a JSON string; fix$"),
    (b'"a"\n"\xff"\n"c"\n', r"^t.jsonl:2 is not a JSON string; fix$"),
    (b'"a"\n"b"\n"c"\n"d"\n', r"^t.jsonl holds 4 texts, meta.json says 3; fix$"),
])
def test_read_texts_jsonl(tmp_path, monkeypatch, raw, match):
    from rosim.index.vector_index import read_texts_jsonl

    monkeypatch.chdir(tmp_path)
    Path("t.jsonl").write_bytes(b'"a"\n"\\u4eca\\n\\t"\n"c"\n')
    assert read_texts_jsonl(Path("t.jsonl"), 3) == ["a", "今\n\t", "c"]
    Path("t.jsonl").write_bytes(raw)
    with pytest.raises(DataError, match=match):
        read_texts_jsonl(Path("t.jsonl"), 3, damaged="; fix")


def test_texts_that_pass_the_recorded_checks_are_still_read_strictly(saved):
    """meta.json without sizes or checksums for texts.jsonl: each line is still checked, and the count."""
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["texts.jsonl"] = {}
    (saved / "meta.json").write_text(json.dumps(meta))
    texts = saved / "texts.jsonl"
    lines = texts.read_bytes().splitlines(keepends=True)
    texts.write_bytes(b"".join([lines[0], b"[1]\n", *lines[2:]]))
    with pytest.raises(DataError, match=r"texts.jsonl:2 is not a JSON string; the index in .* rebuild it"):
        VectorIndex.load(saved)
    texts.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(DataError, match=r"texts.jsonl holds 49 texts, meta.json says 50; the index in .* rebuild"):
        VectorIndex.load(saved)


def test_damaged_meta_and_missing_pieces(saved, tmp_path):
    (saved / "texts.jsonl").rename(saved / "moved")
    with pytest.raises(DataError, match="texts.jsonl is missing"):
        VectorIndex.load(saved)
    (saved / "meta.json").write_text('{"format": "rosim-index", "vers')
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        VectorIndex.load(saved)
    with pytest.raises(InputError, match="not a rosim index"):
        VectorIndex.load(tmp_path)
    with pytest.raises(InputError, match="not found"):
        VectorIndex.load(tmp_path / "nowhere")


def test_save_refuses_to_replace_other_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    index = VectorIndex(24)
    index.add(["a"], clustered(1))
    with pytest.raises(InputError, match="not a rosim index; refusing"):
        index.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_bad_parameters():
    with pytest.raises(InputError, match="kind must be one of"):
        VectorIndex(8, kind="lsh")
    with pytest.raises(InputError, match="nlist must be in 1.."):
        VectorIndex(8, kind="ivf", nlist=0)
    index = VectorIndex(24, kind="ivf", nlist=64)
    with pytest.raises(InputError, match="needs at least 64 vectors to train"):
        index.add(["a", "b"], clustered(2))


class CountingEncoder:
    """Deterministic fake vectors; records how many texts each encode call got."""

    def __init__(self, dim=24):
        self.dim, self.calls = dim, []

    def identity(self):
        return {"name": "counting", "fingerprint": "c0ffee", "dim": self.dim}

    def encode(self, texts, *, batch_size=64, normalize=True, pooling=None, show_progress_bar=None):
        self.calls.append(len(texts))
        return np.stack([clustered(1, self.dim, seed=int(t))[0] for t in texts])


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_streaming_is_chunked(kind):
    enc = CountingEncoder()
    consumed = []

    def texts():
        for i in range(700):
            consumed.append(i)
            yield str(i)

    index = VectorIndex(24, kind=kind, encoder_identity=enc.identity(), pooling=None)
    assert index.add_texts(enc, texts(), chunk_size=64, total=700, show_progress_bar=False) == 700
    assert max(enc.calls) == 64 and sum(enc.calls) == 700 and index.ntotal == 700
    assert index.texts == [str(i) for i in range(700)]
    if kind == "ivf":
        assert index.nlist == default_nlist(700) and index.is_trained


def test_encoder_of_another_dimension_is_refused():
    index = VectorIndex(24, encoder_identity={"name": "m24", "fingerprint": "x", "dim": 24})
    index.add(["a"], clustered(1))
    with pytest.raises(InputError, match=r"makes 16-d vectors but this index holds 24-d.*'m24'"):
        index.search_texts(CountingEncoder(16), "1")


def test_ivfpq_skips_polysemous_training():
    """faiss' index_factory trains polysemous codes for "PQm" unless told "np": ~10x the training time
    for a Hamming pre-filter rosim never uses."""
    import faiss

    index = VectorIndex(32, kind="ivfpq", nlist=4, pq_m=8)
    index.train(clustered(300, dim=32, centers=8))
    assert faiss.downcast_index(index._index).do_polysemous_training is False
