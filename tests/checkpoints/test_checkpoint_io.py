"""rosim's own checkpoint format: bit-identical round trips, atomic writes, strict and explained loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rosim.checkpoints.io import load_checkpoint, load_state_strict, save_checkpoint
from rosim.errors import CheckpointError, InputError
from rosim.tokenization.tokenizer import CharTokenizer
from tests.helpers import tiny_model


def _all_outputs(model, tok):
    enc = tok(["今天天气不错", "广州和深圳哪个好？"], ["今天天气很好", "电影不错"])
    with torch.no_grad():
        bi = model(enc.input_ids, enc.token_type_ids, enc.attention_mask)
        uni = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, mask="unilm")
    return [bi.last_hidden_state, bi.pooled, uni.last_hidden_state, model.lm_logits(uni.last_hidden_state)]


@pytest.mark.parametrize("kw", [{}, {"position": "absolute", "pooler_activation": "tanh"}])
def test_save_then_load_is_bit_identical(tmp_path, kw):
    model, tok = tiny_model(seed=1, **kw)
    save_checkpoint(tmp_path / "ck", model, tok, metadata={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    loaded, tok2, report = load_checkpoint(tmp_path / "ck")
    assert str(report) == "all tensors loaded"
    assert loaded.config == model.config and tok2.vocab == tok.vocab
    for a, b in zip(_all_outputs(model, tok), _all_outputs(loaded, tok2), strict=True):
        assert torch.equal(a, b)
    assert not loaded.training


def test_save_is_atomic(tmp_path):
    model, tok = tiny_model()
    target = tmp_path / "ck"
    save_checkpoint(target, model, tok)
    before = (target / "model.safetensors").read_bytes()

    class Boom(CharTokenizer):
        def save(self, path):
            raise OSError("disk full")

    other, _ = tiny_model(seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, other, Boom(tok.vocab))
    assert (target / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind
    save_checkpoint(target, other, tok)  # replacing works
    assert (target / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_tokenizer_must_match_the_model(tmp_path):
    model, _ = tiny_model()
    small = CharTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "你"])
    with pytest.raises(InputError, match="vocab_size"):
        save_checkpoint(tmp_path / "ck", model, small)
    assert not (tmp_path / "ck").exists()


@pytest.fixture
def saved(tmp_path):
    model, tok = tiny_model()
    save_checkpoint(tmp_path / "ck", model, tok)
    return tmp_path / "ck"


def test_truncated_and_corrupt_safetensors(saved):
    weights = saved / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)
    weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")  # header length far past the end
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(saved)


def test_flipped_bytes_and_nan_weights_are_errors(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    good = bytes(data)
    for i in range(len(data) - 4096, len(data) - 1024, 7):  # flip bytes inside the tensor data
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(saved)
    path.write_bytes(good)
    load_checkpoint(saved)
    state = load_file(str(path))
    state["layers.1.intermediate.weight"][0, 0] = float("nan")
    save_file(state, str(path))  # written by another tool: no checksum, but NaN is still caught
    with pytest.raises(CheckpointError, match=r"NaN or infinite values \['layers.1.intermediate.weight'\]"):
        load_checkpoint(saved)


def test_config_that_does_not_match_the_tensors(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*layers.0.intermediate.weight: checkpoint \(64, 32\) vs model \(48, 32\)"):
        load_checkpoint(saved)
    cfg["intermediate_size"], cfg["num_layers"] = 64, 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.2."):
        load_checkpoint(saved)
    cfg["num_layers"], cfg["hidden_size"] = 2, 30
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="divisible by num_heads"):
        load_checkpoint(saved)
    cfg["hidden_size"], cfg["colour"] = 32, "red"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown keys \['colour'\]"):
        load_checkpoint(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)


def test_missing_and_unexpected_tensors_are_named(saved):
    weights = saved / "model.safetensors"
    state = load_file(str(weights))
    state["layers.0.attention.extra"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers.0.attention.extra'\]"):
        load_checkpoint(saved)
    del state["layers.0.attention.extra"], state["layers.1.ffn_norm.bias"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.ffn_norm.bias'\]"):
        load_checkpoint(saved)


def test_partial_load_of_the_pooler_must_be_asked_for_and_is_reported(saved):
    weights = saved / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("pooler.")}
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['pooler.bias', 'pooler.weight'\].*allow_missing"):
        load_checkpoint(saved)
    model, _, report = load_checkpoint(saved, allow_missing=("pooler.",))
    assert report.missing == ["pooler.bias", "pooler.weight"]
    assert str(report) == "initialised randomly (not in checkpoint): pooler.bias, pooler.weight"
    # allowing the pooler does not let other tensors go missing
    del state["layers.0.ffn_norm.bias"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.0.ffn_norm.bias'\]"):
        load_checkpoint(saved, allow_missing=("pooler.",))


def test_vocab_problems(saved):
    vocab = saved / "vocab.txt"
    lines = vocab.read_text(encoding="utf-8").splitlines()
    vocab.write_text("\n".join(t for t in lines if t != "[MASK]") + "\n[X]\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        load_checkpoint(saved)
    vocab.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab.txt has 119 tokens but config.json says vocab_size=120"):
        load_checkpoint(saved)
    vocab.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load_checkpoint(saved)
    vocab.unlink()
    with pytest.raises(CheckpointError, match="vocabulary file not found"):
        load_checkpoint(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "file")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, InputError)  # bad input: CLI exit status 2


def test_load_state_strict_reports_shapes_and_names():
    model, _ = tiny_model()
    state = dict(model.state_dict())
    state["pooler.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"pooler.weight: checkpoint \(3, 3\) vs model \(32, 32\)"):
        load_state_strict(model, state)


BAD_JSON_FILES = [
    (b"\xff\xfe{}", r"is not UTF-8 text \(invalid start byte at byte 0\)"),
    (b"{not json", r"is not valid JSON: Expecting property name"),
    (b"[1, 2]", r"must hold a JSON object, got list"),
]


@pytest.mark.parametrize(("raw", "match"), BAD_JSON_FILES)
def test_read_json_object_names_the_file_and_the_fault(tmp_path, raw, match):
    from rosim.checkpoints.io import read_json_object

    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=rf"^{path}[: ].*{match}"):
        read_json_object(path)


def test_read_json_object_missing_or_unreadable(tmp_path):
    from rosim.checkpoints.io import read_json_object

    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope.json'} not found$"):
        read_json_object(tmp_path / "nope.json")
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'adir.json'} cannot be read"):
        read_json_object(tmp_path / "adir.json")
    (tmp_path / "ok.json").write_text('{"a": 1}', encoding="utf-8")
    assert read_json_object(tmp_path / "ok.json") == {"a": 1}


@pytest.mark.parametrize(("raw", "match"), BAD_JSON_FILES)
def test_every_checkpoint_reader_gives_the_same_config_errors(tmp_path, raw, match):
    """rosim checkpoints, bert4keras directories and HF directories read their config with one function."""
    from rosim.checkpoints.bert4keras import import_bert4keras
    from rosim.checkpoints.detect import read_hf_config
    from tests.checkpoints.fixtures import write_bert4keras_dir

    model, tok = tiny_model()
    ours = save_checkpoint(tmp_path / "ours", model, tok)
    (ours / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ours)
    b4k = write_bert4keras_dir(tmp_path / "b4k", model, tok)
    (b4k / "bert_config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=match):
        import_bert4keras(b4k)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=match):
        read_hf_config(hf)
