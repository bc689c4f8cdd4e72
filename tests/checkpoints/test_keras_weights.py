"""Keras ``save_weights`` files written by the real bert4keras (TF format and HDF5): detected, converted,
and the converted model equals bert4keras' own outputs (pooler vector, MLM probabilities)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rosim.checkpoints.bert4keras import import_bert4keras
from rosim.checkpoints.detect import detect_format
from rosim.cli import main
from rosim.errors import CheckpointError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_keras", "bert4keras")),
                       reason="needs the [tf] extra (tensorflow-cpu, tf_keras, bert4keras)"),
]

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"今天气不错很好我喜欢北京的秋你他她它是一个人在"]
TOKENS = [[2, 5, 6, 7, 8, 9, 3], [2, 12, 13, 14, 15, 16, 17, 3]]

JOB = r"""
import json, os, sys
os.environ.update(TF_KERAS="1", TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
import numpy as np
import tensorflow as tf
from bert4keras.models import build_transformer_model

out, model_kind, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tf.random.set_seed(0)
bert = build_transformer_model(f"{out}/bert_config.json", model=model_kind, with_pool="linear",
                               application="unilm", return_keras_model=False)
m = bert.model
rng = np.random.default_rng(1)
m.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") for w in m.get_weights()])  # every weight matters
m.save_weights(f"{out}/tf/model.weights")
m.save_weights(f"{out}/h5/model.h5")
ref = {}
for i, ids in enumerate(tokens):
    x = np.array([ids]); seg = np.array([[0] * len(ids)])
    pooled, mlm = m.predict([x, seg], verbose=0)
    ref[str(i)] = {"pooled": pooled[0].tolist(), "mlm_first": mlm[0, 0].tolist()}
json.dump(ref, open(f"{out}/ref.json", "w"))
"""


def _write(root: Path, model_kind: str) -> Path:
    cfg = {"vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 32, "type_vocab_size": 2,
           "initializer_range": 0.02}
    for sub in ("tf", "h5"):
        (root / sub).mkdir(parents=True)
        (root / sub / "bert_config.json").write_text(json.dumps(cfg))
        (root / sub / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (root / "bert_config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", JOB, str(root), model_kind, json.dumps(TOKENS)], check=True, env=env,
                   timeout=600, capture_output=True)
    return root


@pytest.fixture(scope="module", params=["roformer", "bert"])
def files(request, tmp_path_factory):
    return request.param, _write(tmp_path_factory.mktemp(f"keras-{request.param}"), request.param)


def _check_equal(model, ref):
    for i, ids in enumerate(TOKENS):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(x, torch.zeros_like(x), torch.ones_like(x), mask="unilm")
            probs = torch.softmax(model.lm_logits(out.last_hidden_state[0, 0]), -1)
        np.testing.assert_allclose(out.pooled[0].numpy(), ref[str(i)]["pooled"], atol=1e-5)
        np.testing.assert_allclose(probs.numpy(), ref[str(i)]["mlm_first"], atol=1e-5)


@pytest.mark.parametrize("layout, target", [("TF format", "tf/model.weights"), ("HDF5", "h5/model.h5"),
                                            ("HDF5", "h5")])
def test_converted_model_equals_bert4keras(files, layout, target):
    kind, root = files
    fmt, evidence = detect_format(root / target)
    assert fmt == "bert4keras" and "save_weights" in evidence
    model, tok, report = import_bert4keras(root / target)
    assert model.config.position == ("rotary" if kind == "roformer" else "absolute")
    assert any(layout in n for n in report.notes)
    _check_equal(model, json.loads((root / "ref.json").read_text()))


def test_cli_converts_without_flags(files, tmp_path, capsys):
    _, root = files
    assert main(["convert", str(root / "h5" / "model.h5"), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "save_weights" in captured.out + captured.err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_config_and_truncated_file_are_clear(files, tmp_path):
    _, root = files
    lone = tmp_path / "lone.h5"
    lone.write_bytes((root / "h5" / "model.h5").read_bytes())
    with pytest.raises(CheckpointError, match="put the bert_config.json and vocab.txt"):
        import_bert4keras(lone)
    cut = tmp_path / "cut" / "model.h5"
    cut.parent.mkdir()
    for name in ("bert_config.json", "vocab.txt"):
        (cut.parent / name).write_bytes((root / "h5" / name).read_bytes())
    cut.write_bytes((root / "h5" / "model.h5").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_bert4keras(cut)
