"""Importing HF-format RoFormer-Sim (junnyu/roformer_chinese_sim_char_* layout) and BERT checkpoints.

The synthetic checkpoints are made by transformers' own classes with their own random weights, and
the imported model is checked against transformers' outputs: the names are right if the numbers agree.
"""

from __future__ import annotations

import pytest
import torch

from rosim.checkpoints.hf import import_hf
from rosim.errors import CheckpointError
from tests.checkpoints.fixtures import write_hf_dir
from tests.helpers import tiny_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # "add is_decoder=True": we want the bidirectional reference

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu")


def _roformer_sim(tok, seed=0):
    """RoFormerForCausalLM + a pooler, as the PyTorch port publishes RoFormer-Sim."""
    torch.manual_seed(seed)
    cfg = transformers.RoFormerConfig(vocab_size=len(tok), **SIZES)
    hf = transformers.RoFormerForCausalLM(cfg).eval()  # is_decoder=False: a bidirectional reference
    pooler = torch.nn.Linear(32, 32)
    state = dict(hf.state_dict())
    state["roformer.pooler.dense.weight"] = pooler.weight.detach()
    state["roformer.pooler.dense.bias"] = pooler.bias.detach()
    config = cfg.to_dict()
    config.update(is_decoder=True, pooler_activation="linear", architectures=["RoFormerForCausalLM"])
    return hf, pooler, state, config


def _inputs(tok):
    enc = tok(["今天天气不错", "我喜欢北京"], ["今天天气很好", "我不喜欢北京啊"])
    return enc.input_ids, enc.token_type_ids, enc.attention_mask


def test_junnyu_key_layout():
    tok = tiny_tokenizer()
    _, _, state, _ = _roformer_sim(tok)
    assert {k for k in state if not k.startswith("roformer.encoder.layer.")} == {
        "roformer.embeddings.word_embeddings.weight", "roformer.embeddings.token_type_embeddings.weight",
        "roformer.embeddings.LayerNorm.weight", "roformer.embeddings.LayerNorm.bias",
        "roformer.encoder.embed_positions.weight", "roformer.pooler.dense.weight", "roformer.pooler.dense.bias",
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
    }


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_hf_roformer_sim_import_matches_transformers(tmp_path, fmt):
    tok = tiny_tokenizer()
    hf, pooler, state, config = _roformer_sim(tok)
    d = write_hf_dir(tmp_path / "hf", state, config, tok, fmt=fmt)
    model, tok2, report = import_hf(d)
    assert str(report) == "all tensors loaded"
    assert model.config.position == "rotary" and model.config.pooler_activation == "linear"
    ids, types, mask = _inputs(tok2)
    with torch.no_grad():
        ours = model(ids, types, mask)
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        ref_hidden = ref.hidden_states[-1]
    keep = mask.bool()
    assert (ours.last_hidden_state - ref_hidden)[keep].abs().max() < 1e-5
    assert (ours.pooled - pooler(ref_hidden[:, 0])).abs().max() < 1e-5  # linear pooler, no tanh
    assert (model.lm_logits(ours.last_hidden_state) - ref.logits)[keep].abs().max() < 1e-4


def test_hf_bert_import_matches_transformers(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), **SIZES)
    hf = transformers.BertForPreTraining(cfg).eval()
    d = write_hf_dir(tmp_path / "bert", hf.state_dict(), cfg.to_dict(), tok, fmt="bin")
    # transformers' BertModel applies tanh in its pooler: ask for it to compare (SimBERT's default is linear)
    model, tok2, report = import_hf(d, variant="bert", pooler_activation="tanh")
    assert report.ignored == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]  # NSP: said, not silent
    assert model.config.position == "absolute" and model.config.pooler_activation == "tanh"
    assert "pooler activation: tanh (asked for)" in str(report)
    default, _, report = import_hf(d, variant="bert")
    assert default.config.pooler_activation == "linear" and "with_pool='linear'" in str(report)
    ids, types, mask = _inputs(tok2)
    with torch.no_grad():
        ours = model(ids, types, mask)
        ref = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
        logits = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).prediction_logits
    keep = mask.bool()
    assert (ours.last_hidden_state - ref.last_hidden_state)[keep].abs().max() < 1e-5
    assert (ours.pooled - ref.pooler_output).abs().max() < 1e-5
    assert (model.lm_logits(ours.last_hidden_state) - logits)[keep].abs().max() < 1e-4


def test_bare_bert_model_without_prefix(tmp_path):
    tok = tiny_tokenizer()
    cfg = transformers.BertConfig(vocab_size=len(tok), **SIZES)
    hf = transformers.BertModel(cfg).eval()  # keys without "bert."; no MLM head
    d = write_hf_dir(tmp_path / "bert", hf.state_dict(), cfg.to_dict(), tok, fmt="safetensors")
    model, _, report = import_hf(d, variant="bert", pooler_activation="tanh")  # BertModel: tanh
    assert model.lm_head is None and "no MLM head" in str(report)
    ids, types, mask = _inputs(tok)
    with torch.no_grad():
        assert (model(ids, types, mask).pooled - hf(input_ids=ids, token_type_ids=types, attention_mask=mask).pooler_output).abs().max() < 1e-5


def test_missing_pooler_needs_explicit_partial_load(tmp_path):
    tok = tiny_tokenizer()
    _, _, state, config = _roformer_sim(tok)
    state = {k: v for k, v in state.items() if "pooler" not in k}  # plain RoFormerForCausalLM: no pooler
    d = write_hf_dir(tmp_path / "hf", state, config, tok, fmt="safetensors")
    with pytest.raises(CheckpointError, match=r"no pooler.*--allow-missing pooler"):
        import_hf(d)
    model, _, report = import_hf(d, allow_missing=("pooler.",))
    assert report.missing == ["pooler.bias", "pooler.weight"]
    assert "initialised randomly (not in checkpoint): pooler.bias, pooler.weight" in str(report)


def test_unexpected_and_missing_tensors_are_named(tmp_path):
    tok = tiny_tokenizer()
    _, _, state, config = _roformer_sim(tok)
    state["roformer.encoder.layer.0.attention.self.rel_bias"] = torch.zeros(4)
    d = write_hf_dir(tmp_path / "a", state, config, tok, fmt="bin")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['roformer.encoder.layer.0.attention.self.rel_bias'\]"):
        import_hf(d)
    del state["roformer.encoder.layer.0.attention.self.rel_bias"]
    del state["roformer.encoder.layer.1.output.dense.bias"]
    d = write_hf_dir(tmp_path / "b", state, config, tok, fmt="bin")
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.ffn_output.bias'\]"):
        import_hf(d)


def test_untied_decoder_is_refused(tmp_path):
    tok = tiny_tokenizer()
    _, _, state, config = _roformer_sim(tok)
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"].clone() + 1
    d = write_hf_dir(tmp_path / "a", state, config, tok, fmt="bin")
    with pytest.raises(CheckpointError, match="not tied"):
        import_hf(d)


def test_bad_hf_directories(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(CheckpointError, match="not found"):
        import_hf(tmp_path / "nope")
    _, _, state, config = _roformer_sim(tok)
    d = write_hf_dir(tmp_path / "a", state, config, tok, fmt="bin")
    raw = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        import_hf(d)
    d = write_hf_dir(tmp_path / "b", state, config, tok, fmt="safetensors")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_hf(d)
    d = write_hf_dir(tmp_path / "c", state, {**config, "intermediate_size": 48}, tok, fmt="safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_hf(d)
    d = write_hf_dir(tmp_path / "d", state, config, tok, fmt="safetensors")
    (d / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="special tokens"):
        import_hf(d)
