"""ONNX export (fp32 + int8) of tiny random models, and the torch-free OnnxEncoder that runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from rosim.errors import CheckpointError, InputError  # noqa: E402
from rosim.inference.onnx_backend import MANIFEST_NAME, OnnxEncoder  # noqa: E402
from rosim.inference.onnx_export import ExportVerificationError, export_onnx  # noqa: E402
from rosim.inference.sim_model import SimModel  # noqa: E402
from tests.helpers import SENTENCES, one_torch_thread, tiny_model  # noqa: E402, F401  (autouse fixture)

LONG = "这家餐厅的菜很好吃，服务也很周到。" * 6  # longer than max_length: truncated the same way
TEXTS = [*SENTENCES, LONG, "饕"]  # "饕" is not in the tiny vocabulary: [UNK]


def sim_model(seed=0, **kw) -> SimModel:
    model, tok = tiny_model(seed=seed, **kw)
    return SimModel(model, tok, name=f"tiny-{seed}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sim = sim_model(seed=0)
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    manifest = export_onnx(sim, out)
    return sim, out, manifest


def test_export_writes_the_layout_and_manifest(exported):
    sim, out, manifest = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "model.int8.onnx", "vocab.txt", "config.json", MANIFEST_NAME])
    on_disk = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["dim"] == 32 and manifest["max_length"] == 64 and manifest["pooling"] == "pooler"
    assert manifest["verification"]["fp32_max_abs_diff"] <= 1e-4
    assert manifest["verification"]["int8_min_cosine"] >= 0.98
    ident = sim.identity()
    assert {k: manifest["source"][k] for k in ("name", "fingerprint", "weights")} == {
        k: ident[k] for k in ("name", "fingerprint", "weights")}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_fp32_matches_torch_on_padded_batches(exported, batch_size):
    sim, out, _ = exported
    enc = OnnxEncoder(out)
    ref = sim.encode(TEXTS, normalize=False, batch_size=batch_size)
    got = enc.encode(TEXTS, normalize=False, batch_size=batch_size)
    assert got.shape == ref.shape == (len(TEXTS), 32) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=batch_size), sim.encode(TEXTS), atol=1e-5)


def test_int8_is_close(exported):
    sim, out, _ = exported
    got = OnnxEncoder(out, precision="int8", threads=1).encode(TEXTS)
    ref = sim.encode(TEXTS)
    assert np.einsum("ij,ij->i", got, ref).min() > 0.98  # a random 2 x 32 model; the embedded one: 0.9996


def test_similarity_and_identity_follow_sim_model(exported):
    sim, out, _ = exported
    enc = OnnxEncoder(out)
    a, b = SENTENCES[:3], SENTENCES[3:6]
    assert isinstance(enc.similarity(a[0], b[0]), float)
    assert enc.similarity(a[0], b[0]) == pytest.approx(sim.similarity(a[0], b[0]), abs=1e-5)
    np.testing.assert_allclose(enc.similarity(a, b), sim.similarity(a, b), atol=1e-5)
    assert enc.similarity(a, b[:2]).shape == (3, 2)
    np.testing.assert_allclose(enc.similarity_pairwise(a, b), sim.similarity_pairwise(a, b), atol=1e-5)
    assert enc.encode(a[0]).shape == (32,)
    assert enc.identity() == sim.identity()  # an index built with the torch model accepts the export


def test_encode_rejects_what_sim_model_rejects(exported):
    _, out, _ = exported
    enc = OnnxEncoder(out)
    with pytest.raises(InputError, match="is empty"):
        enc.encode(["好", "  "])
    with pytest.raises(InputError, match="no texts"):
        enc.encode([])
    with pytest.raises(InputError, match="sentence vector only.*--backend torch"):
        enc.encode(["好"], pooling="cls")
    with pytest.raises(InputError, match="batch_size"):
        enc.encode(["好"], batch_size=0)
    with pytest.raises(InputError, match="precision"):
        OnnxEncoder(out, precision="int4")


@pytest.mark.parametrize("kw", [
    dict(with_pooler=False, sentence_pooling="mean"),  # E5-style: mean over the tokens, no pooler
    dict(position="absolute", pooler_activation="tanh"),  # SimBERT v1 / BERT variant
])
def test_other_model_variants_export(tmp_path, kw):
    sim = sim_model(seed=3, **kw)
    manifest = export_onnx(sim, tmp_path / "m", int8=False)
    assert manifest["int8"] is None and "model.int8.onnx" not in manifest["files"]
    enc = OnnxEncoder(tmp_path / "m")
    assert np.abs(enc.encode(TEXTS, normalize=False, batch_size=4)
                  - sim.encode(TEXTS, normalize=False, batch_size=4)).max() <= 1e-4
    with pytest.raises(CheckpointError, match="no int8 model"):
        OnnxEncoder(tmp_path / "m", precision="int8")


def _no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if name in p.name]


def test_model_without_pooler_is_refused_and_nothing_written(tmp_path):
    sim = sim_model(with_pooler=False)
    with pytest.raises(InputError, match="no sentence vector.*no pooler"):
        export_onnx(sim, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_failed_verification_leaves_nothing(tmp_path):
    with pytest.raises(ExportVerificationError, match="differs from the PyTorch model"):
        export_onnx(sim_model(), tmp_path / "out", int8=False, atol=-1.0)
    assert _no_leftovers(tmp_path, "out")
    with pytest.raises(ExportVerificationError, match="int8 model's vectors"):
        export_onnx(sim_model(), tmp_path / "out", int8_min_cosine=1.01)
    assert _no_leftovers(tmp_path, "out")


def test_destination_rules(tmp_path, exported):
    _, out, _ = exported
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        export_onnx(sim_model(), other)
    with pytest.raises(InputError, match="not a rosim ONNX export"):
        export_onnx(sim_model(), other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export_onnx(sim_model(), tmp_path / "file")


@pytest.fixture
def copy_of(exported, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(exported[1], dst)
    return dst


def test_corrupt_model_is_refused(copy_of):
    path = copy_of / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        OnnxEncoder(copy_of)
    OnnxEncoder(copy_of, precision="int8")  # the other file is intact
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="truncated"):
        OnnxEncoder(copy_of)


def test_unloadable_onnx_without_checksums_is_one_clear_line(copy_of):
    path = copy_of / "model.onnx"
    size = path.stat().st_size
    path.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(CheckpointError, match="not a loadable ONNX model") as err:
        OnnxEncoder(copy_of, verify=False)
    assert "\n" not in str(err.value)


def test_mismatched_files_are_refused(copy_of, tmp_path):
    other = tmp_path / "other"
    export_onnx(sim_model(seed=1), other, int8=False)
    (copy_of / "model.onnx").write_bytes((other / "model.onnx").read_bytes())  # another model's weights
    with pytest.raises(CheckpointError, match="from another export"):
        OnnxEncoder(copy_of)
    (copy_of / MANIFEST_NAME).write_text((other / MANIFEST_NAME).read_text())
    OnnxEncoder(copy_of)  # consistent again (other's model + other's manifest) ...
    with pytest.raises(CheckpointError, match="no int8 model"):  # ... which has no int8 file
        OnnxEncoder(copy_of, precision="int8")


def test_bad_manifests(copy_of, tmp_path):
    manifest = copy_of / MANIFEST_NAME
    good = manifest.read_text()
    manifest.write_text(good[:40])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        OnnxEncoder(copy_of)
    manifest.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        OnnxEncoder(copy_of)
    manifest.unlink()
    with pytest.raises(CheckpointError, match="not a rosim ONNX export"):
        OnnxEncoder(copy_of)
    with pytest.raises(CheckpointError, match="not found"):
        OnnxEncoder(tmp_path / "missing")


def test_onnx_path_never_imports_torch(exported, tmp_path):
    """The point of the backend for a short-lived process: no `import torch` (~2 s), in sim, encode,
    index build and search."""
    _, out, _ = exported
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    m, idx = str(out), str(tmp_path / "idx")
    code = (
        "import sys\n"
        "from rosim.cli import main\n"
        f"rc = main(['sim', '今天天气不错', '今天天气很好', '--model', {m!r}, '--backend', 'onnx'])\n"
        f"rc |= main(['sim', '今天天气不错', '我喜欢北京', '--model', {m!r}])\n"
        f"rc |= main(['encode', {str(corpus)!r}, '-o', {str(tmp_path / 'v.npy')!r}, '--model', {m!r}, '-q'])\n"
        f"rc |= main(['index', 'build', {str(corpus)!r}, '-o', {idx!r}, '--model', {m!r}, '-q'])\n"
        f"rc |= main(['search', {idx!r}, '我喜欢北京', '-k', '1', '--model', {m!r}, '--backend', 'onnx'])\n"
        "import rosim\n"
        "assert rc == 0, rc\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH', loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "TORCH []", res.stdout
    float(lines[0]), float(lines[1])
    assert lines[2].endswith("\t我喜欢北京")


def test_export_of_a_half_precision_model_leaves_it_untouched(tmp_path):
    import torch

    sim = sim_model(seed=4)
    sim.model.to(torch.bfloat16)
    manifest = export_onnx(sim, tmp_path / "m", int8=False)  # exported from an fp32 CPU copy
    assert manifest["verification"]["fp32_max_abs_diff"] <= 1e-4
    assert {p.dtype for p in sim.model.parameters()} == {torch.bfloat16}


def test_missing_onnxruntime_says_what_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(InputError, match=r"pip install 'rosim\[onnx\]'"):
        OnnxEncoder(exported[1])
