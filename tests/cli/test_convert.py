"""``rosim convert`` / ``rosim info``: round trips and one-line errors with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rosim.checkpoints.hf import import_hf, rosim_to_hf_names
from rosim.checkpoints.io import load_checkpoint
from rosim.cli import main
from tests.checkpoints.fixtures import bert4keras_arrays, write_bert4keras_dir, write_hf_dir
from tests.helpers import tiny_model


def _hf_dir(path: Path, model, tok, *, pooler=True) -> Path:
    """Our tiny model written in the junnyu HF layout."""
    names = rosim_to_hf_names(model.config, "roformer")
    state = {names[k]: v for k, v in model.state_dict().items() if pooler or not k.startswith("pooler.")}
    state["cls.predictions.decoder.weight"] = state["roformer.embeddings.word_embeddings.weight"]
    c = model.config
    config = {"model_type": "roformer", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position,
              "hidden_act": "gelu", "type_vocab_size": 2, "embedding_size": c.hidden_size, "rotary_value": False}
    return write_hf_dir(path, state, config, tok, fmt="bin")


def _same_outputs(a, b, tok):
    enc = tok(["今天天气不错"], ["今天天气很好"])
    with torch.no_grad():
        x = a(enc.input_ids, enc.token_type_ids, mask="unilm")
        y = b(enc.input_ids, enc.token_type_ids, mask="unilm")
    return torch.equal(x.last_hidden_state, y.last_hidden_state) and torch.equal(x.pooled, y.pooled) and torch.equal(
        a.lm_logits(x.last_hidden_state), b.lm_logits(y.last_hidden_state))


def test_convert_hf_round_trip(tmp_path, capsys):
    model, tok = tiny_model(seed=4)
    src = _hf_dir(tmp_path / "hf", model, tok)
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "hf"]) == 0
    out = capsys.readouterr().out
    assert "load report: all tensors loaded" in out and "rotary positions, 2 layers" in out
    loaded, tok2, _ = load_checkpoint(tmp_path / "out")
    assert tok2.vocab == tok.vocab and _same_outputs(model, loaded, tok)

    assert main(["info", str(tmp_path / "out")]) == 0
    info = capsys.readouterr().out
    assert '"hidden_size": 32' in info and f"parameters: {model.num_parameters():,}" in info


@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_convert_bert4keras_round_trip(tmp_path, capsys, position):
    model, tok = tiny_model(seed=5, position=position)
    src = write_bert4keras_dir(tmp_path / "b4k", model, tok)
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "bert4keras"]) == 0
    assert "all tensors loaded" in capsys.readouterr().out
    loaded, _, _ = load_checkpoint(tmp_path / "out")
    assert loaded.config.position == position and _same_outputs(model, loaded, tok)


def test_convert_hf_bert(tmp_path, capsys):
    model, tok = tiny_model(seed=6, position="absolute", pooler_activation="tanh")
    names = rosim_to_hf_names(model.config, "bert")
    c = model.config
    config = {"vocab_size": c.vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 128, "hidden_act": "gelu", "type_vocab_size": 2}
    src = write_hf_dir(tmp_path / "bert", {names[k]: v for k, v in model.state_dict().items()}, config, tok,
                       fmt="safetensors")
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "bert", "--pooler-activation", "linear"]) == 0
    loaded, _, _ = load_checkpoint(tmp_path / "out")
    assert loaded.config.pooler_activation == "linear"
    model.config.pooler_activation = "linear"
    assert _same_outputs(model, loaded, tok)


def test_allow_missing_pooler(tmp_path, capsys):
    model, tok = tiny_model()
    src = _hf_dir(tmp_path / "hf", model, tok, pooler=False)
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rosim: error: ") and "--allow-missing pooler" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "hf", "--allow-missing", "pooler"]) == 0
    assert "initialised randomly (not in checkpoint): pooler.bias, pooler.weight" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "o2"), "--from", "hf", "--allow-missing", "encoder"]) == 2
    assert "--allow-missing accepts ['pooler']" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    def run(*args):
        code = main(list(args))
        err = capsys.readouterr().err
        return code, err

    code, err = run("convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--from", "hf")
    assert code == 2 and "not found" in err and "Traceback" not in err

    model, tok = tiny_model()
    src = write_bert4keras_dir(tmp_path / "b4k", model, tok)
    data = src / "bert_model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    code, err = run("convert", str(src), str(tmp_path / "out"), "--from", "bert4keras")
    assert code == 2 and "truncated" in err and not (tmp_path / "out").exists()

    hf = _hf_dir(tmp_path / "hf", model, tok)
    (hf / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    code, err = run("convert", str(hf), str(tmp_path / "out"), "--from", "hf")
    assert code == 2 and "corrupt" in err

    code, err = run("convert", str(hf), str(tmp_path / "out"), "--from", "tf2")
    assert code == 2 and "tf2" in err

    code, err = run("convert", str(hf), str(tmp_path / "out"), "--from", "hf", "--model", "bert")
    assert code == 2 and "--model applies to --from bert4keras only" in err

    code, err = run("info", str(tmp_path / "missing"))
    assert code == 2 and "not found" in err


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    model, tok = tiny_model()
    src = write_bert4keras_dir(tmp_path / "b4k", model, tok)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(src), str(dst), "--from", "bert4keras"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert main(["convert", str(src), str(dst), "--from", "bert4keras", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert main(["convert", str(src), str(src), "--from", "bert4keras", "--overwrite"]) == 2


def test_imported_and_converted_models_agree(tmp_path):
    """What `convert` writes loads to the same model the Python importer returns."""
    model, tok = tiny_model(seed=8)
    src = _hf_dir(tmp_path / "hf", model, tok)
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "hf"]) == 0
    direct, _, _ = import_hf(src)
    loaded, _, _ = load_checkpoint(tmp_path / "out")
    assert _same_outputs(direct, loaded, tok)
    assert set(bert4keras_arrays(loaded)) == set(bert4keras_arrays(direct))


# ------------------------------------------------------------------ format detection (--from auto)
def _bert_dir(path: Path, model, tok, *, config_name="config.json") -> Path:
    names = rosim_to_hf_names(model.config, "bert")
    c = model.config
    config = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
              "num_attention_heads": c.num_heads, "intermediate_size": c.intermediate_size,
              "max_position_embeddings": c.max_position, "hidden_act": "gelu", "type_vocab_size": 2}
    d = write_hf_dir(path, {names[k]: v for k, v in model.state_dict().items()}, config, tok, fmt="safetensors")
    if config_name != "config.json":
        (d / "config.json").rename(d / config_name)
    return d


def test_auto_detects_every_importable_format(tmp_path, capsys):
    model, tok = tiny_model(seed=8)
    bert, btok = tiny_model(seed=9, position="absolute")
    cases = {
        "hf": _hf_dir(tmp_path / "hf", model, tok),
        "bert": _bert_dir(tmp_path / "bert", bert, btok),
        "bert4keras": write_bert4keras_dir(tmp_path / "b4k", model, tok),
    }
    for fmt, src in cases.items():
        out = tmp_path / f"out-{fmt}"
        assert main(["convert", str(src), str(out)]) == 0, capsys.readouterr().err
        assert f"detected: {fmt} (" in capsys.readouterr().out
        loaded, _, _ = load_checkpoint(out)
        assert _same_outputs(bert if fmt == "bert" else model, loaded, tok)
    # an explicit --from that contradicts the files names what is there
    assert main(["convert", str(cases["bert"]), str(tmp_path / "x"), "--from", "hf"]) == 2
    err = capsys.readouterr().err
    assert "--from hf does not match" in err and "use --from bert" in err and len(err.splitlines()) == 1
    assert main(["convert", str(cases["hf"]), str(tmp_path / "x"), "--from", "bert4keras"]) == 2
    assert "use --from hf" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "out-hf"), str(tmp_path / "x")]) == 2
    assert "already a rosim checkpoint" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "x")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bert4torch_config_and_simbert_linear_pooler(tmp_path, capsys):
    bert, tok = tiny_model(seed=9, position="absolute")
    src = _bert_dir(tmp_path / "b4t", bert, tok, config_name="bert4torch_config.json")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "config read from bert4torch_config.json" in out and "with_pool='linear'" in out
    loaded, _, _ = load_checkpoint(tmp_path / "out")
    assert loaded.config.pooler_activation == "linear" and _same_outputs(bert, loaded, tok)
    assert main(["info", str(tmp_path / "out")]) == 0  # the report stays with the checkpoint
    assert "converted from bert:" in capsys.readouterr().out


def test_roformer_v2_and_a_keras_bundle_without_object_graph_are_named(tmp_path, capsys):
    import json

    model, tok = tiny_model(seed=8)
    src = _hf_dir(tmp_path / "v2", model, tok)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "norm_type": "rms_norm", "use_bias": False}))
    assert main(["convert", str(src), str(tmp_path / "x")]) == 2
    assert "RoFormer v2 (no biases, RMS-style norm) is not supported" in capsys.readouterr().err
    from tests.checkpoints.fixtures import write_bundle

    (tmp_path / "keras").mkdir()
    write_bundle(tmp_path / "keras" / "best_model.weights",
                 {"layer_with_weights-0/embeddings/.ATTRIBUTES/VARIABLE_VALUE": torch.zeros(4, 2).numpy()})
    assert main(["convert", str(tmp_path / "keras"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a Keras save_weights checkpoint (no object graph)" in err and len(err.splitlines()) == 1
    (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    assert main(["convert", str(tmp_path / "w.h5"), str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert "Keras HDF5" in captured.out and "not a readable HDF5 file (truncated or corrupt?)" in captured.err
    assert not (tmp_path / "x").exists()
