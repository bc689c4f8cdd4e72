"""`rosim export onnx` and `--backend onnx|onnx-int8` on sim, encode, search, eval: outputs and exit codes."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from rosim.checkpoints.io import save_checkpoint  # noqa: E402
from rosim.cli import main  # noqa: E402
from rosim.inference.onnx_backend import MANIFEST_NAME  # noqa: E402
from tests.helpers import SENTENCES, one_torch_thread, tiny_model  # noqa: E402, F401  (autouse fixture)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def models(ckpt):
    """Checkpoints a and b (different weights, tests/cli/conftest.py) and the ONNX exports of both, made through the CLI."""
    root = ckpt
    assert main(["export", "onnx", str(root / "a"), str(root / "a-onnx")]) == 0
    assert main(["export", "onnx", str(root / "b"), str(root / "b-onnx"), "--no-int8"]) == 0
    return root


def test_export_reports_what_it_checked(capsys, tmp_path):
    model, tok = tiny_model(seed=2)
    save_checkpoint(tmp_path / "c", model, tok)
    code, out, err = run(capsys, "export", "onnx", tmp_path / "c", tmp_path / "c-onnx", "--per-tensor")
    assert code == 0, err
    assert "model.onnx" in out and "model.int8.onnx" in out and "fp32 max |diff|" in out and "int8 cosine" in out
    manifest = json.loads((tmp_path / "c-onnx" / MANIFEST_NAME).read_text())
    assert manifest["int8"]["per_channel"] is False
    # again: refused without --overwrite, replaced with it
    code, _, err = run(capsys, "export", "onnx", tmp_path / "c", tmp_path / "c-onnx", "--no-int8")
    assert code == 2 and "--overwrite" in err
    code, _, _ = run(capsys, "export", "onnx", tmp_path / "c", tmp_path / "c-onnx", "--no-int8", "--overwrite")
    assert code == 0 and not (tmp_path / "c-onnx" / "model.int8.onnx").exists()


def test_sim_on_each_backend_agrees(capsys, models):
    a, b = SENTENCES[0], SENTENCES[1]
    code, torch_out, _ = run(capsys, "sim", a, b, "--model", models / "a")
    assert code == 0
    for backend in ("onnx", "onnx-int8", "auto"):
        code, out, err = run(capsys, "sim", a, b, "--model", models / "a-onnx", "--backend", backend)
        assert code == 0, err
        assert float(out) == pytest.approx(float(torch_out), abs=2e-4 if backend != "onnx-int8" else 0.05)


def test_encode_onnx_writes_vectors(capsys, models, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    code, _, _ = run(capsys, "encode", src, "-o", tmp_path / "t.npy", "--model", models / "a", "-q")
    assert code == 0
    code, _, err = run(capsys, "encode", src, "-o", tmp_path / "o.npy", "--model", models / "a-onnx", "-q")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), np.load(tmp_path / "t.npy"), atol=1e-5)
    code, _, err = run(capsys, "encode", src, "-o", tmp_path / "x.npy", "--model", models / "a-onnx",
                       "--pooling", "cls")
    assert code == 2 and "--backend torch" in err and not (tmp_path / "x.npy").exists()


def test_search_a_torch_index_with_its_export_and_refuse_another_model(capsys, models, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    assert run(capsys, "index", "build", corpus, "-o", idx, "--model", models / "a", "-q")[0] == 0
    code, out, err = run(capsys, "search", idx, SENTENCES[4], "-k", "2", "--model", models / "a-onnx",
                         "--backend", "onnx")
    assert code == 0, err
    assert out.splitlines()[0] == f"1.0000\t{SENTENCES[4]}"
    code, out, err = run(capsys, "search", idx, SENTENCES[4], "--model", models / "b-onnx")
    assert code == 2 and out == "" and "built with" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "search", idx, SENTENCES[4], "--backend", "onnx")
    assert code == 2 and "needs --model" in err


def test_eval_on_onnx(capsys, models, tmp_path):
    pairs = tmp_path / "test.tsv"
    pairs.write_text("".join(f"{SENTENCES[i]}\t{SENTENCES[(i + 1) % 10]}\t{i % 3}\n" for i in range(10)),
                     encoding="utf-8")
    scores = {}
    for backend, model in (("torch", "a"), ("onnx", "a-onnx")):
        code, out, err = run(capsys, "eval", pairs, "--model", models / model, "--backend", backend, "--json", "-q")
        assert code == 0, err
        scores[backend] = json.loads(out)["results"][0]["spearman"]
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=1e-6)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, models, tmp_path):
    model, tok = tiny_model(seed=0, with_pooler=False)
    save_checkpoint(tmp_path / "nopool", model, tok)
    cases = [
        (("export", "onnx", tmp_path / "nopool", tmp_path / "out"), "no sentence vector"),
        (("export", "onnx", tmp_path / "missing", tmp_path / "out"), "not found"),
        (("export", "onnx", models / "a-onnx", tmp_path / "out"), "already an ONNX export"),
        (("export", "onnx", models / "a", models / "a"), "model directory"),
        (("sim", "好", "坏", "--backend", "onnx"), "needs --model"),
        (("sim", "好", "坏", "--model", models / "a", "--backend", "onnx"), "not a rosim ONNX export"),
        (("sim", "好", "坏", "--model", models / "a-onnx", "--backend", "torch"), "is an ONNX export"),
        (("sim", "好", "坏", "--model", models / "b-onnx", "--backend", "onnx-int8"), "no int8 model"),
        (("sim", "好", "坏", "--model", models / "a-onnx", "--backend", "tensorrt"), "--backend must be"),
        (("sim", "好", " ", "--model", models / "a-onnx"), "is empty"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_corrupt_export_exits_2(capsys, models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models / "a-onnx", broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    data[-100] ^= 0x55
    (broken / "model.onnx").write_bytes(bytes(data))
    code, out, err = run(capsys, "sim", "好", "坏", "--model", broken)
    assert code == 2 and out == "" and "SHA-256" in err
