"""Issue 17 item 9: litter from killed runs, invisible texts, one-line errors, self-replacing
convert, failed training runs, warning floods, tiny max_position, offline /docs (in tests/server)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from rosim.checkpoints.io import save_checkpoint
from rosim.cli import main
from rosim.errors import InputError
from rosim.textio import atomic_write, clean_stale, read_lines
from tests.helpers import SENTENCES, tiny_config, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = tiny_model()
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", model, tok)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------- litter of kill -9
def _litter(parent, name, pid):
    """What a writer of ``parent/name`` killed with kill -9 leaves: its temporary file or directory."""
    (parent / f".{name}.{pid}-k9x2.tmp").write_bytes(b"partial")
    (parent / f".{name}.tmp-{pid}-q1w2").mkdir()
    (parent / f".{name}.tmp-{pid}-q1w2" / "vectors.faiss").write_bytes(b"partial")
    old = parent / f".{name}.abcd1234.tmp"  # the name an older rosim gave it (no pid): removed once old
    old.write_bytes(b"partial")
    os.utime(old, (1, 1))


def test_the_next_encode_removes_the_litter_of_a_killed_one(capsys, ckpt, tmp_path):
    texts = tmp_path / "in.txt"
    texts.write_text("今天\n明天\n", encoding="utf-8")
    _litter(tmp_path, "v.npy", _dead_pid())
    code, _, err = run(capsys, "encode", texts, "-o", tmp_path / "v.npy", "-m", ckpt, "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "v.npy"]


def test_the_next_index_build_removes_the_litter_of_a_killed_one(capsys, ckpt, tmp_path):
    pytest.importorskip("faiss")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    pid = _dead_pid()
    _litter(tmp_path, "idx", pid)
    (tmp_path / ".idx.lock").write_bytes(b"")  # a killed holder's lock file
    code, _, err = run(capsys, "index", "build", corpus, "-o", tmp_path / "idx", "-m", ckpt, "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "idx"]


def test_a_real_kill_9_during_index_build_leaves_nothing_after_the_next_run(ckpt, tmp_path):
    """kill -9 while the index directory is being written (a slow corpus: the write is reached)."""
    pytest.importorskip("faiss")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{s}{i}" for i in range(300) for s in SENTENCES) + "\n", encoding="utf-8")
    code = ("import sys, time, rosim.index.vector_index as v\n"
            "real = v.VectorIndex.save\n"
            "def slow(self, d):\n"
            "    import faiss; w = faiss.write_index\n"
            "    def stall(*a): w(*a); print('writing', flush=True); time.sleep(60)\n"
            "    faiss.write_index = stall\n"
            "    return real(self, d)\n"
            "v.VectorIndex.save = slow\n"
            "from rosim.cli import main; sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "index", "build", str(corpus), "-o", str(tmp_path / "idx"),
                             "-m", str(ckpt), "-q"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert any(p.name.startswith(".idx.") for p in tmp_path.iterdir())  # litter, as the issue saw
    assert main(["index", "build", str(corpus), "-o", str(tmp_path / "idx"), "-m", str(ckpt), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "idx"]


def test_clean_stale_keeps_the_files_of_live_writers(tmp_path):
    target = tmp_path / "out.npy"
    live = tmp_path / f".out.npy.{os.getppid()}-abcd.tmp"  # our parent is alive
    live.write_bytes(b"")
    young = tmp_path / ".out.npy.abcd1234.tmp"  # no pid, recent: maybe an older rosim still writing
    young.write_bytes(b"")
    other = tmp_path / ".other.npy.1-x.tmp"
    other.write_bytes(b"")
    assert clean_stale(target) == []
    with atomic_write(target, "wb") as f:
        np.save(f, np.zeros(2))
    assert live.exists() and young.exists() and other.exists()


# ---------------------------------------------------------------------- invisible texts
@pytest.mark.parametrize("text", ["\x00", "\u200b\u200b", "\x01\x02 \t", "\ufeff"])
def test_invisible_texts_are_refused_like_empty_ones(capsys, ckpt, text):
    code, _, err = run(capsys, "sim", text, "今天", "-m", ckpt)
    assert code == 2 and "no visible character" in err and len(err.strip().splitlines()) == 1


def test_invisible_texts_over_http(sim):
    from fastapi.testclient import TestClient

    from rosim.server import create_app

    with TestClient(create_app(sim)) as client:
        for text in ("\x00", "\u200b", "\x01\u200d"):
            r = client.post("/encode", json={"texts": [text]})
            assert r.status_code == 422 and "no visible character" in r.json()["error"]["message"]
        assert client.post("/encode", json={"texts": ["\u200b今天"]}).status_code == 200


def test_invisible_lines_of_a_file_are_skipped_like_empty_ones(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("今天\n\x00\n\u200b\n明天\n", encoding="utf-8")
    assert read_lines(path) == ["今天", "明天"]


@pytest.fixture(scope="module")
def sim():
    from rosim.inference.sim_model import SimModel

    model, tok = tiny_model()
    return SimModel(model, tok)


# ---------------------------------------------------------------------- one-line errors
def test_serve_on_a_busy_port_is_one_line(capsys, ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", ckpt, "--port", port)
    assert code == 2 and err.strip().splitlines() == [f"rosim: error: 127.0.0.1:{port} is already in use: "
                                                      "pick another --port"]
    assert "serving" not in err + out


@pytest.mark.parametrize("argv", [["sim"], ["similar", "--nope"], ["frobnicate"], ["sim", "a", "b", "--model"]])
def test_usage_errors_are_one_line(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("rosim: error: ") and "--help" in err


def test_convert_refuses_to_replace_its_own_source(capsys, tmp_path):
    from tests.cli.test_convert import _hf_dir

    model, tok = tiny_model()
    src = _hf_dir(tmp_path / "hf", model, tok)
    before = sorted(p.name for p in src.iterdir())
    code, _, err = run(capsys, "convert", src, src, "--from", "hf", "--overwrite")
    assert code == 2 and "would destroy the source" in err
    assert sorted(p.name for p in src.iterdir()) == before


# ---------------------------------------------------------------------- training, classify, config
def test_training_on_unusable_data_leaves_no_run_behind(capsys, ckpt, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"y": 2}\n', encoding="utf-8")
    config = tmp_path / "t.toml"
    config.write_text(f'[model]\ninit = "{ckpt}"\n[data]\nsources = [{{path = "bad.jsonl"}}]\n'
                      'skip_bad_lines = true\n[train]\nout_dir = "run"\nsteps = 2\nbatch_size = 4\n')
    code, _, err = run(capsys, "train", "stage1", "-c", config)
    assert code == 2 and "no usable records" in err
    assert not (tmp_path / "run").exists()


def test_one_sample_classes_give_one_warning_line(capsys, ckpt, tmp_path):
    rng = np.random.default_rng(0)
    chars = "".join(SENTENCES).replace(" ", "")
    train = tmp_path / "train.tsv"
    train.write_text("".join("".join(rng.choice(list(chars), 6)) + f"\tL{i}\n" for i in range(300)), encoding="utf-8")
    code, out, err = run(capsys, "classify", "fit", train, "-o", tmp_path / "clf", "-m", ckpt, "-q")
    assert code == 0, err
    assert err.strip().splitlines() == ["rosim: warning: 300 of 300 classes have a single sample: they add nothing "
                                        "to the shared covariance, and their means are single points; give each "
                                        "class several examples"]
    assert len(out) < 400


def test_a_tiny_max_position_is_refused(tmp_path, capsys):
    with pytest.raises(InputError, match="cut every text to 2 characters"):
        tiny_config(100, max_position=4)
    model, tok = tiny_model()
    path = save_checkpoint(tmp_path / "m", model, tok)
    config = json.loads((path / "config.json").read_text())
    config["max_position"] = 4
    (path / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "sim", "今天天气", "今天", "-m", path)
    assert code == 2 and "max_position = 4" in err
