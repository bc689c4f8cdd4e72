"""Issue 17 items 5 and 6: every bad input is one line on stderr and exit status 2, never a
traceback or a runaway allocation. Each case is the issue's one-line reproduction."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rosim import limits
from rosim.checkpoints.io import save_checkpoint
from rosim.cli import main
from rosim.errors import InputError
from tests.helpers import SENTENCES, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = tiny_model()
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", model, tok)


def fails_cleanly(capsys, *argv, match: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    return err


# ---------------------------------------------------------------------- item 5: sizes
@pytest.mark.parametrize("n", ["1000000000", "1000000", "99999999999999999999999"])
def test_similar_n_is_bounded(capsys, ckpt, n):
    fails_cleanly(capsys, "similar", "今天", "-m", ckpt, "-n", n, match=f"n must be in 1..{limits.MAX_N}")


def test_similar_huge_seed(capsys, ckpt):
    fails_cleanly(capsys, "similar", "今天", "-m", ckpt, "-n", 4, "-k", 2, "--seed", "9" * 23,
                  match="seed must be in 0..")


def test_index_hnsw_m_is_bounded(capsys, ckpt, tmp_path):
    pytest.importorskip("faiss")
    corpus = tmp_path / "c.txt"
    corpus.write_text("今天\n", encoding="utf-8")
    fails_cleanly(capsys, "index", "build", corpus, "-o", tmp_path / "idx", "-m", ckpt, "--approx", "hnsw",
                  "--hnsw-m", "100000000", match=f"hnsw_m must be in 1..{limits.MAX_HNSW_M}")
    assert not (tmp_path / "idx").exists()


def _edit_config(ckpt, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_config_sizes_are_bounded_before_allocating(capsys, ckpt, tmp_path):
    huge = _edit_config(ckpt, tmp_path, hidden_size=6_000_000)
    fails_cleanly(capsys, "info", huge, match="hidden_size = 6000000 exceeds")


def test_limits_module_checks():
    assert limits.check_int("x", 3, 1, 5) == 3
    for bad in (0, 6, True, 2.0, "3", np.float64(3.0), np.bool_(True), np.int64(6)):
        with pytest.raises(InputError, match="x must be"):
            limits.check_int("x", bad, 1, 5)
    assert limits.check_seed(None) is None and limits.check_seed(limits.MAX_SEED) == limits.MAX_SEED


def test_numpy_integers_are_integers_and_come_back_as_int():
    for value in (np.int64(3), np.int32(3), np.uint8(3)):
        got = limits.check_int("x", value, 1, 5)
        assert got == 3 and type(got) is int
    got = limits.check_similar_options(n=np.int64(8), k=np.int32(2), top_p=1, max_new_tokens=np.uint16(4),
                                       seed=np.int64(7))
    assert got == (8, 2, 1.0, 4, 7) and all(type(v) is int for v in (got[0], got[1], got[3], got[4]))
    from rosim.index import VectorIndex

    index = VectorIndex(16, kind="ivf", nlist=np.int64(4), nprobe=np.int64(2))
    assert type(index.nlist) is int and type(index.nprobe) is int  # what meta.json records is JSON-able


@pytest.mark.parametrize(("options", "message"), [
    ({"n": 0}, f"n must be in 1..{limits.MAX_N}, got 0"),
    ({"n": 2.0}, "n must be an integer"),
    ({"k": 0}, "k must be in 1.."),
    ({"n": 4, "k": 5}, "k (5) cannot exceed n (4): only n candidates are generated"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"top_p": float("nan")}, "top_p must be a number, got nan"),
    ({"max_new_tokens": limits.MAX_GEN_LENGTH + 1}, f"max_new_tokens must be in 1..{limits.MAX_GEN_LENGTH}"),
    ({"seed": -1}, "seed must be in 0.."),
])
def test_similar_options_are_checked_in_one_place(options, message):
    good = {"n": 8, "k": None, "top_p": None, "max_new_tokens": 16, "seed": None}
    assert limits.check_similar_options(**good) == (8, None, None, 16, None)
    with pytest.raises(InputError) as err:
        limits.check_similar_options(**{**good, **options})
    assert message in str(err.value)


def test_sim_model_takes_numpy_integers(ckpt):
    from rosim.inference.sim_model import SimModel

    sim = SimModel.from_pretrained(ckpt)
    out = sim.similar("今天", n=np.int64(3), k=np.int32(2), max_new_tokens=np.int64(4), seed=np.int64(1),
                      show_progress_bar=False)
    assert len(out) <= 2
    assert out == sim.similar("今天", n=3, k=2, max_new_tokens=4, seed=1, show_progress_bar=False)


# ---------------------------------------------------------------------- item 6: bad input paths
@pytest.mark.parametrize("argv", [["sim", "\udcff", "x"], ["similar", "\udcff", "-n", "4", "-k", "2"]])
def test_invalid_utf8_arguments(capsys, ckpt, argv):
    err = fails_cleanly(capsys, *argv, "-m", ckpt, match="not valid UTF-8")
    assert "0xff" in err


def test_invalid_utf8_search_query(capsys, ckpt, tmp_path):
    pytest.importorskip("faiss")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    assert main(["index", "build", str(corpus), "-o", str(tmp_path / "idx"), "-m", str(ckpt), "-q"]) == 0
    capsys.readouterr()
    fails_cleanly(capsys, "search", tmp_path / "idx", "\udcff", match="not valid UTF-8")


def test_invalid_utf8_argv_in_a_real_process(ckpt):
    """The bytes as a shell passes them (Python decodes argv with surrogate escapes)."""
    run = subprocess.run([sys.executable.encode(), b"-c", b"import sys; from rosim.cli import main; sys.exit(main())",
                          b"sim", b"\xff", b"x", b"-m", str(ckpt).encode()], capture_output=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.decode().strip().splitlines() == ["rosim: error: text 0 is not valid UTF-8 text "
                                                        "(byte 0xff at character 0)"]


def test_output_under_a_file(capsys, ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    texts = tmp_path / "in.txt"
    texts.write_text("今天\n", encoding="utf-8")
    fails_cleanly(capsys, "encode", texts, "-o", tmp_path / "afile" / "v.npy", "-m", ckpt, match="is a file")


def test_index_meta_with_bad_files_field(capsys, ckpt, tmp_path):
    pytest.importorskip("faiss")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    assert main(["index", "build", str(corpus), "-o", str(idx), "-m", str(ckpt), "-q"]) == 0
    meta = json.loads((idx / "meta.json").read_text())
    meta["files"] = [1]
    (idx / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    fails_cleanly(capsys, "search", idx, "今天", match="'files' must map")


@pytest.fixture
def classifier(ckpt, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{t}\t{i % 2}\n" for i, t in enumerate(SENTENCES)), encoding="utf-8")
    assert main(["classify", "fit", str(train), "-o", str(tmp_path / "clf"), "-m", str(ckpt), "-q"]) == 0
    capsys.readouterr()
    texts = tmp_path / "in.txt"
    texts.write_text("今天\n", encoding="utf-8")
    return tmp_path / "clf", texts


def test_classifier_truncated_arrays(capsys, classifier):
    clf, texts = classifier
    arrays = clf / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:100])
    fails_cleanly(capsys, "classify", "predict", clf, texts, match="cannot read the classifier")


def test_classifier_classes_not_a_list(capsys, classifier):
    clf, texts = classifier
    config = json.loads((clf / "config.json").read_text())
    config["classes"] = "01"
    (clf / "config.json").write_text(json.dumps(config))
    fails_cleanly(capsys, "classify", "predict", clf, texts, match="'classes' must be a list")


@pytest.mark.parametrize("line, match", [
    ('lr = "abc"', "[train] lr must be a number"),
    ("betas = 5", "[train] betas must be a list of numbers"),
    ("out_dir = 5", "[train] out_dir must be a string"),
])
def test_train_config_types(capsys, tmp_path, line, match):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nvocab = "build"\n[data]\nsources = [{{path = "d.jsonl"}}]\n[train]\n{line}\n')
    fails_cleanly(capsys, "train", "stage1", "-c", config, match=match)


def test_train_config_source_path_type(capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[model]\nvocab = "build"\n[data]\nsources = [{path = 5}]\n')
    fails_cleanly(capsys, "train", "stage1", "-c", config, match="sources[0] path must be a string")


def test_layer_norm_eps_not_a_number(capsys, ckpt, tmp_path):
    bad = _edit_config(ckpt, tmp_path, layer_norm_eps="x")
    fails_cleanly(capsys, "info", bad, match="layer_norm_eps must be a number")


def test_hf_config_layer_norm_eps_not_a_number(tmp_path):
    from rosim.checkpoints.hf import config_from_hf

    with pytest.raises(InputError, match="layer_norm_eps must be a number"):
        config_from_hf({"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 64, "layer_norm_eps": "x"}, variant="roformer")
