"""Sharded encoding and an index built from shards: equal to one-process indexing, resumable, strict."""

import subprocess
import sys

import numpy as np
import pytest

from rosim.errors import DataError, InputError
from rosim.index import VectorIndex, build_from_shards, default_nlist, encode_shards, list_shards
from rosim.index.shards import VECTORS_FILE, shard_name
from rosim.index.vector_index import TextsOnDisk
from rosim.inference.sim_model import SimModel
from tests.helpers import SENTENCES, tiny_model
from tests.index.test_vector_index import brute_force, clustered

CORPUS = [f"{s}{i}" for i in range(4) for s in SENTENCES]  # 40 distinct texts


@pytest.fixture(scope="module")
def sim():
    model, tok = tiny_model(seed=0)
    return SimModel(model, tok, name="tiny-a")


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(CORPUS[:20]) + "\n\n" + "\n".join(CORPUS[20:]) + "\n", encoding="utf-8")  # an empty line
    return p


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_workers_then_merge_equal_one_process_index(sim, corpus, tmp_path):
    shards = tmp_path / "shards"
    assert encode_shards(sim, corpus, shards, shard_size=7, rank=1, world_size=2) == [1, 3, 5]
    with pytest.raises(InputError, match="lacks 3 of 6 shards"):
        build_from_shards(shards, kind="exact")
    assert encode_shards(sim, corpus, shards, shard_size=7, rank=0, world_size=2) == [0, 2, 4]
    assert [s.count for s in list_shards(shards)] == [7, 7, 7, 7, 7, 5]
    merged = build_from_shards(shards, kind="exact")
    whole = VectorIndex.from_file(sim, corpus)
    assert merged.texts == whole.texts == CORPUS
    np.testing.assert_allclose(merged.vectors(), whole.vectors(), atol=1e-5)  # batches differ: last bits may
    assert merged.encoder_identity == whole.encoder_identity and merged.pooling == "pooler"
    saved = VectorIndex.load(merged.save(tmp_path / "idx"), sim)
    assert [h.text for h in saved.search_texts(sim, CORPUS[9], k=1)] == [CORPUS[9]]


def test_a_rerun_redoes_only_missing_shards_and_cleans_a_killed_workers_litter(sim, corpus, tmp_path):
    shards = tmp_path / "shards"
    encode_shards(sim, corpus, shards, shard_size=10)
    kept = {p.name: p.stat().st_ino for p in shards.iterdir()}
    import shutil

    shutil.rmtree(shards / shard_name(2))
    litter = shards / f".{shard_name(2)}.tmp-{dead_pid()}-abc"  # what kill -9 during shard 2 leaves
    litter.mkdir()
    (litter / VECTORS_FILE).write_bytes(b"half")
    assert encode_shards(sim, corpus, shards, shard_size=10) == [2]
    assert not litter.exists()
    assert {p.name: p.stat().st_ino for p in shards.iterdir() if p.name != shard_name(2)} == \
        {k: v for k, v in kept.items() if k != shard_name(2)}
    assert encode_shards(sim, corpus, shards, shard_size=10) == []  # all done: nothing to redo


def test_shards_of_another_job_are_refused(sim, corpus, tmp_path):
    shards = tmp_path / "shards"
    encode_shards(sim, corpus, shards, shard_size=10)
    other_model, tok = tiny_model(seed=1)
    with pytest.raises(InputError, match="built with"):
        encode_shards(SimModel(other_model, tok, name="tiny-b"), corpus, shards, shard_size=10)
    with pytest.raises(InputError, match="--shard-size 10, not 20"):
        encode_shards(sim, corpus, shards, shard_size=20)
    with pytest.raises(InputError, match="pooling"):
        encode_shards(sim, corpus, shards, shard_size=10, pooling="mean")
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus.read_text(encoding="utf-8") + "多一句\n", encoding="utf-8")
    with pytest.raises(InputError, match="another corpus"):
        encode_shards(sim, changed, shards, shard_size=10)
    # a shard moved in from another model's job
    elsewhere = tmp_path / "elsewhere"
    encode_shards(SimModel(other_model, tok, name="tiny-b"), corpus, elsewhere, shard_size=10)
    import shutil

    shutil.rmtree(shards / shard_name(1))
    shutil.copytree(elsewhere / shard_name(1), shards / shard_name(1))
    with pytest.raises(InputError, match="built with"):
        build_from_shards(shards)


def test_damaged_shards_are_reported(sim, corpus, tmp_path):
    shards = tmp_path / "shards"
    encode_shards(sim, corpus, shards, shard_size=10)
    vec = shards / shard_name(1) / VECTORS_FILE
    raw = bytearray(vec.read_bytes())
    raw[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"  # same size, other bytes
    vec.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        build_from_shards(shards)
    vec.write_bytes(bytes(raw[:-4]))  # truncated
    with pytest.raises(DataError, match="not a whole rosim shard"):
        build_from_shards(shards)
    import shutil

    shutil.rmtree(shards / shard_name(1))
    meta = shards / shard_name(2) / "meta.json"
    meta.write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        list_shards(shards)
    with pytest.raises(InputError, match="holds no shards"):
        build_from_shards(tmp_path)
    with pytest.raises(InputError, match="not found"):
        build_from_shards(tmp_path / "nowhere")


def test_bad_arguments(sim, corpus, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="rank"):
        encode_shards(sim, corpus, tmp_path / "s", rank=2, world_size=2)
    with pytest.raises(InputError, match="shard_size"):
        encode_shards(sim, corpus, tmp_path / "s", shard_size=0)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="not integers"):
        encode_shards(sim, corpus, tmp_path / "s")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's environment picks the shards
    assert encode_shards(sim, corpus, tmp_path / "s", shard_size=5) == [1, 4, 7]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="no texts"):
        encode_shards(sim, empty, tmp_path / "s2")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="not a directory"):
        encode_shards(sim, corpus, tmp_path / "afile")


class FakeEncoder:
    """Stands in for a model: fixed vectors per text, so an IVF built from shards can be checked at size."""

    def __init__(self, table):
        self.table = table

    def identity(self):
        return {"name": "fake", "weights": "w", "fingerprint": "f", "dim": self.table.shape[1], "max_length": 8}

    def encode(self, texts, **kwargs):
        return self.table[[int(t) for t in texts]]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_from_shards_trains_on_a_sample_across_shards(tmp_path, kind):
    db = clustered(12_000, dim=32, centers=60)
    corpus = tmp_path / "ids.txt"
    corpus.write_text("".join(f"{i}\n" for i in range(len(db))), encoding="utf-8")
    enc = FakeEncoder(db)
    for rank in range(3):
        encode_shards(enc, corpus, tmp_path / "shards", shard_size=2500, rank=rank, world_size=3)
    index = build_from_shards(tmp_path / "shards", kind=kind, seed=0, **({"pq_m": 8} if kind == "ivfpq" else {}))
    assert index.ntotal == 12_000 and index.texts[:3] == ["0", "1", "2"] and index.nlist == default_nlist(12_000)
    queries = clustered(50, dim=32, centers=60, seed=7)
    _, ids = index.search(queries, 10)
    _, ref = brute_force(db, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref, strict=True)])
    assert recall > (0.9 if kind == "ivf" else 0.5), recall
    again = VectorIndex.load(index.save(tmp_path / "idx"))
    assert again.kind == kind and again.ntotal == 12_000
    np.testing.assert_array_equal(again.search(queries, 10)[1], ids)


def default_nlist_for(n):
    from rosim.index import default_nlist

    return default_nlist(n)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_cells_on_disk_give_the_in_memory_index_results_and_survive_a_move(tmp_path, kind):
    db = clustered(6_000, dim=32, centers=40)
    corpus = tmp_path / "ids.txt"
    corpus.write_text("".join(f"{i}\n" for i in range(len(db))), encoding="utf-8")
    for rank in range(2):
        encode_shards(FakeEncoder(db), corpus, tmp_path / "shards", shard_size=1700, rank=rank, world_size=2)
    params = {"pq_m": 8} if kind == "ivfpq" else {}
    in_memory = build_from_shards(tmp_path / "shards", kind=kind, seed=0, **params)
    on_disk = build_from_shards(tmp_path / "shards", kind=kind, seed=0, on_disk=tmp_path / "idx", **params)
    assert on_disk.on_disk and not in_memory.on_disk and (tmp_path / "idx" / "vectors.ivfdata").is_file()
    assert list(on_disk.texts) == in_memory.texts and on_disk.ntotal == 6_000
    # the texts stay on disk: read when asked for, through the offsets of their lines
    assert isinstance(on_disk.texts, TextsOnDisk) and len(on_disk.texts) == 6_000
    assert on_disk.texts[-1] == "5999" and on_disk.texts[10:13] == ["10", "11", "12"]
    with pytest.raises(IndexError):
        on_disk.texts[6_000]
    assert not [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("cells-")]
    queries = clustered(40, dim=32, centers=40, seed=3)
    scores, ids = in_memory.search(queries, 10)
    np.testing.assert_array_equal(on_disk.search(queries, 10)[1], ids)
    # the lists file is found beside vectors.faiss after the directory moves, and a saved copy is whole
    (tmp_path / "idx").rename(tmp_path / "moved")
    moved = VectorIndex.load(tmp_path / "moved")
    assert moved.on_disk
    np.testing.assert_allclose(moved.search(queries, 10)[0], scores, atol=1e-5)
    copy = VectorIndex.load(moved.save(tmp_path / "copy"))
    np.testing.assert_array_equal(copy.search(queries, 10)[1], ids)
    np.testing.assert_allclose(copy.vectors(), in_memory.vectors(), atol=1e-6)
    with pytest.raises(InputError, match="cannot grow"):
        moved.add(["x"], db[:1])


def test_cells_on_disk_damage_and_bad_kinds_are_reported(tmp_path):
    db = clustered(3_000, dim=16, centers=20)
    corpus = tmp_path / "ids.txt"
    corpus.write_text("".join(f"{i}\n" for i in range(len(db))), encoding="utf-8")
    encode_shards(FakeEncoder(db), corpus, tmp_path / "shards", shard_size=1000)
    with pytest.raises(InputError, match="IVF"):
        build_from_shards(tmp_path / "shards", kind="hnsw", on_disk=tmp_path / "h")
    assert not (tmp_path / "h").exists()
    build_from_shards(tmp_path / "shards", kind="ivf", on_disk=tmp_path / "idx")
    data = tmp_path / "idx" / "vectors.ivfdata"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        VectorIndex.load(tmp_path / "idx")
    data.unlink()
    with pytest.raises(DataError, match="ivfdata is missing"):
        VectorIndex.load(tmp_path / "idx")
    # offsets that do not describe texts.jsonl, and a damaged line, found even without checksums
    build_from_shards(tmp_path / "shards", kind="ivf", on_disk=tmp_path / "idx2")
    offsets = tmp_path / "idx2" / "texts.offsets.npy"
    good = np.load(offsets)
    np.save(offsets, good[:-1])
    with pytest.raises(DataError, match="texts.offsets.npy is truncated"):
        VectorIndex.load(tmp_path / "idx2", verify=False)
    bad = good.copy()
    bad[-1] += 1  # same size, wrong end
    np.save(offsets, bad)
    with pytest.raises(DataError, match="does not describe texts.jsonl"):
        VectorIndex.load(tmp_path / "idx2", verify=False)
    np.save(offsets, good)
    texts = tmp_path / "idx2" / "texts.jsonl"
    raw = bytearray(texts.read_bytes())
    raw[int(good[5])] = ord("x")  # line 6 no longer starts with a quote
    texts.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"texts.jsonl:6 is not a JSON string"):
        VectorIndex.load(tmp_path / "idx2", verify=False).texts[5]


def test_damaged_shard_texts_are_reported(sim, corpus, tmp_path):
    shards = tmp_path / "shards"
    encode_shards(sim, corpus, shards, shard_size=10)
    shard = list_shards(shards)[1]
    assert shard.texts() == CORPUS[10:20]
    texts = shard.path / "texts.jsonl"
    raw = texts.read_bytes()
    texts.write_bytes(b"[" + raw[1:])  # same size: read_shard's size check passes, the line does not
    with pytest.raises(DataError, match=rf"texts.jsonl:1 is not a JSON string; delete {shard.path} and run"):
        list_shards(shards)[1].texts()


def test_vector_blocks_read_a_shard_in_pieces(sim, corpus, tmp_path):
    encode_shards(sim, corpus, tmp_path / "shards", shard_size=25)
    shard = list_shards(tmp_path / "shards")[0]
    blocks = list(shard.vector_blocks(rows=7))
    assert [lo for lo, _ in blocks] == [0, 7, 14, 21] and [len(b) for _, b in blocks] == [7, 7, 7, 4]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), shard.vectors())
    np.testing.assert_array_equal(shard.rows(np.array([0, 3, 24])), shard.vectors()[[0, 3, 24]])
