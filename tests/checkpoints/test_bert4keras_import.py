"""Importing original bert4keras TF checkpoints (RoFormer-Sim and SimBERT v1 layouts)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rosim.checkpoints.bert4keras import import_bert4keras, tf_names
from rosim.checkpoints.tf_bundle import TFCheckpoint, crc32c, mask_crc
from rosim.errors import CheckpointError
from tests.checkpoints.fixtures import (
    HAVE_TF,
    bert4keras_arrays,
    run_tensorflow,
    write_bert4keras_dir,
    write_bundle,
)
from tests.helpers import tiny_model


def _outputs(model, tok):
    enc = tok(["今天天气不错", "我喜欢北京"], ["今天天气很好", "我不喜欢北京"])
    with torch.no_grad():
        out = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, mask="unilm")
        return out.last_hidden_state, out.pooled, model.lm_logits(out.last_hidden_state)


def _assert_identical(a, b):
    for x, y in zip(_outputs(*a), _outputs(*b), strict=True):
        assert torch.equal(x, y)


def test_crc32c_reference_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8)
    # the vectorised path agrees with the byte-at-a-time definition
    from rosim.checkpoints.tf_bundle import _register

    assert crc32c(data) == _register(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    assert mask_crc(0) == 0xA282EAD8


def test_variable_names_are_bert4keras_0_10_6():
    model, _ = tiny_model()
    names = {tf for tf, _ in tf_names(model.config).values()}
    assert names == set(bert4keras_arrays(model))
    assert "bert/embeddings/position_embeddings" not in names  # RoFormer: rotary, no table
    assert {"bert/pooler/dense/kernel", "cls/predictions/transform/dense/kernel", "cls/predictions/output_bias",
            "bert/encoder/layer_1/attention/output/LayerNorm/gamma"} <= names
    bert, _ = tiny_model(position="absolute")
    assert "bert/embeddings/position_embeddings" in {tf for tf, _ in tf_names(bert.config).values()}


@pytest.mark.slow
def test_checkpoint_written_by_tensorflow_saver(tmp_path):
    """A checkpoint saved by a real tf.compat.v1 Saver (as bert4keras does) imports exactly; and
    TensorFlow reads the bundles our test writer makes (so the pure-Python tests mean something)."""
    if not HAVE_TF:
        message = "needs the tf extra (pip install -e '.[tf]')"
        if os.environ.get("CI"):  # CI must run this check, not skip it
            pytest.fail(f"CI {message}")
        pytest.skip(message)
    model, tok = tiny_model()
    arrays = bert4keras_arrays(model)
    d = tmp_path / "tf"
    write_bert4keras_dir(d, model, tok, arrays={})  # config + vocab; checkpoint below
    (d / "bert_model.ckpt.index").unlink()
    write_bundle(tmp_path / "ours", arrays)
    back = run_tensorflow(tmp_path / "job", save=(d / "bert_model.ckpt", arrays), read=tmp_path / "ours")
    assert sorted(back) == sorted(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)

    imported, tok2, report = import_bert4keras(d)
    assert report.ignored == ["global_step"] and not report.missing
    assert tok2.vocab == tok.vocab
    _assert_identical((model, tok), (imported, tok2))


@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_import_gives_identical_outputs(tmp_path, position):
    model, tok = tiny_model(seed=3, position=position)
    d = write_bert4keras_dir(tmp_path / "ckpt", model, tok)
    imported, tok2, report = import_bert4keras(d)  # variant detected from the position table
    assert str(report) == "all tensors loaded"
    assert imported.config.position == position
    assert imported.config.pooler_activation == "linear" and imported.config.attention_dropout == 0.0
    assert imported.config.extra["imported_from"] == "bert4keras"
    _assert_identical((model, tok), (imported, tok2))
    # the prefix and the .index file name the same checkpoint
    again, _, _ = import_bert4keras(d / "bert_model.ckpt.index")
    assert torch.equal(again.pooler.weight, imported.pooler.weight)


def test_missing_pooler_is_an_error_unless_asked(tmp_path):
    model, tok = tiny_model()
    arrays = {k: v for k, v in bert4keras_arrays(model).items() if not k.startswith("bert/pooler/")}
    d = write_bert4keras_dir(tmp_path / "c", model, tok, arrays=arrays)
    with pytest.raises(CheckpointError, match=r"no pooler .*allow-missing pooler"):
        import_bert4keras(d)
    imported, _, report = import_bert4keras(d, allow_missing=("pooler.",))
    assert report.missing == ["pooler.bias", "pooler.weight"]
    assert "initialised randomly" in str(report) and "pooler.weight" in str(report)
    assert imported.pooler is not None


def test_missing_and_unexpected_variables_are_named(tmp_path):
    model, tok = tiny_model()
    arrays = bert4keras_arrays(model)
    del arrays["bert/encoder/layer_1/intermediate/dense/bias"]
    arrays["bert/encoder/layer_0/attention/self/query/extra"] = np.zeros(3, np.float32)
    arrays["bert/encoder/layer_0/attention/self/query/kernel/adam_m"] = np.zeros((32, 32), np.float32)
    d = write_bert4keras_dir(tmp_path / "c", model, tok, arrays=arrays)
    with pytest.raises(CheckpointError, match=r"unexpected variables \['bert/encoder/layer_0/attention/self/query/extra'\]"):
        import_bert4keras(d)
    del arrays["bert/encoder/layer_0/attention/self/query/extra"]
    write_bert4keras_dir(d, model, tok, arrays=arrays)
    with pytest.raises(CheckpointError, match=r"missing variables \['bert/encoder/layer_1/intermediate/dense/bias'\]"):
        import_bert4keras(d)


def test_wrong_variant_is_explained(tmp_path):
    bert, tok = tiny_model(position="absolute")
    d = write_bert4keras_dir(tmp_path / "c", bert, tok)
    with pytest.raises(CheckpointError, match="position table means a BERT checkpoint"):
        import_bert4keras(d, model="roformer")
    roformer, tok = tiny_model()
    d = write_bert4keras_dir(tmp_path / "r", roformer, tok)
    with pytest.raises(CheckpointError, match="position_embeddings.*RoFormer"):
        import_bert4keras(d, model="bert")


def test_optimizer_state_and_nsp_are_reported_not_loaded(tmp_path):
    model, tok = tiny_model()
    arrays = bert4keras_arrays(model)
    arrays["global_step"] = np.array(7, dtype=np.int64)
    arrays["cls/seq_relationship/output_weights"] = np.zeros((2, 32), np.float32)
    arrays["bert/pooler/dense/kernel/adam_v"] = np.zeros((32, 32), np.float32)
    d = write_bert4keras_dir(tmp_path / "c", model, tok, arrays=arrays)
    imported, _, report = import_bert4keras(d)
    assert report.ignored == ["bert/pooler/dense/kernel/adam_v", "cls/seq_relationship/output_weights", "global_step"]
    _assert_identical((model, tok), (imported, tok))


def test_checkpoint_without_mlm_head_has_no_lm_head(tmp_path):
    model, tok = tiny_model()
    arrays = {k: v for k, v in bert4keras_arrays(model).items() if not k.startswith("cls/")}
    d = write_bert4keras_dir(tmp_path / "c", model, tok, arrays=arrays)
    imported, _, report = import_bert4keras(d)
    assert imported.lm_head is None and "no MLM head" in str(report)


def test_config_that_does_not_match_the_tensors(tmp_path):
    model, tok = tiny_model()
    d = write_bert4keras_dir(tmp_path / "c", model, tok)
    cfg = json.loads((d / "bert_config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "bert_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"intermediate/dense/kernel: checkpoint \(32, 64\) vs config \(32, 48\)"):
        import_bert4keras(d)
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 64
    (d / "bert_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing variables.*layer_2"):
        import_bert4keras(d)
    del cfg["hidden_size"]
    (d / "bert_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        import_bert4keras(d)


def test_corrupt_and_truncated_files(tmp_path):
    model, tok = tiny_model()
    d = write_bert4keras_dir(tmp_path / "c", model, tok)
    data = d / "bert_model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        import_bert4keras(d)
    data.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match="truncated"):
        import_bert4keras(d)
    index = d / "bert_model.ckpt.index"
    idx = bytearray(index.read_bytes())
    index.write_bytes(bytes(idx[:-10]))
    with pytest.raises(CheckpointError, match="index is truncated or corrupt"):
        TFCheckpoint(d)
    idx[20] ^= 0x01
    index.write_bytes(bytes(idx))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        TFCheckpoint(d)


def test_bad_directory_and_vocab(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        import_bert4keras(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no TensorFlow checkpoint \(\*.index\)"):
        import_bert4keras(tmp_path / "empty")
    model, tok = tiny_model()
    d = write_bert4keras_dir(tmp_path / "c", model, tok)
    lines = (d / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (d / "vocab.txt").write_text("\n".join(["[unused0]" if t == "[CLS]" else t for t in lines]) + "\n")
    with pytest.raises(CheckpointError, match=r"special tokens \['\[CLS\]'\]"):
        import_bert4keras(d)
    (d / "vocab.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CheckpointError, match="vocab.txt has 119 tokens"):
        import_bert4keras(d)
    (d / "bert_config.json").unlink()
    with pytest.raises(CheckpointError, match="bert_config.json"):
        import_bert4keras(d)


def test_half_precision_checkpoint(tmp_path):
    """bert4keras' save_weights_as_checkpoint(dtype='float16') output loads as float32 values."""
    model, tok = tiny_model()
    arrays = {k: v.astype(np.float16) for k, v in bert4keras_arrays(model).items()}
    d = write_bert4keras_dir(tmp_path / "c", model, tok, arrays=arrays)
    imported, _, _ = import_bert4keras(d)
    assert imported.pooler.weight.dtype == torch.float32
    assert torch.equal(imported.pooler.weight, torch.from_numpy(arrays["bert/pooler/dense/kernel"].T.astype(np.float32)))
