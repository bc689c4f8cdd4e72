"""Our encoder equals transformers' RoFormer and BERT with the same weights."""

import pytest
import torch

from rosim.checkpoints.hf import rosim_to_hf_names
from rosim.modeling.model import RoFormerSim
from tests.helpers import tiny_config

transformers = pytest.importorskip("transformers")


def _inputs(vocab, batch=3, length=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids, types, mask


def _copy_into_hf(ours: RoFormerSim, hf_model, prefix: str):
    names = rosim_to_hf_names(ours.config, prefix)
    hf_state = hf_model.state_dict()
    for k, v in ours.state_dict().items():
        key = names[k][len(prefix) + 1:] if names[k][len(prefix) + 1:] in hf_state else names[k]
        if key in hf_state:
            hf_state[key] = v.clone()
    hf_model.load_state_dict(hf_state)


def test_roformer_hidden_states_match_transformers():
    torch.manual_seed(0)
    cfg = tiny_config(100, hidden_dropout=0.1)
    ours = RoFormerSim(cfg).eval()
    hf_cfg = transformers.RoFormerConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_act="gelu", type_vocab_size=2,
    )
    hf = transformers.RoFormerModel(hf_cfg).eval()
    _copy_into_hf(ours, hf, "roformer")
    ids, types, mask = _inputs(100)
    with torch.no_grad():
        a = ours(ids, types, mask).last_hidden_state
        b = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a - b)[keep].abs().max() < 1e-5


def test_bert_variant_matches_transformers():
    torch.manual_seed(0)
    cfg = tiny_config(100, position="absolute", pooler_activation="tanh")
    ours = RoFormerSim(cfg).eval()
    hf_cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_act="gelu", type_vocab_size=2,
    )
    hf = transformers.BertModel(hf_cfg).eval()
    _copy_into_hf(ours, hf, "bert")
    ids, types, mask = _inputs(100)
    with torch.no_grad():
        out = ours(ids, types, mask)
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    keep = mask.bool()
    assert (out.last_hidden_state - ref.last_hidden_state)[keep].abs().max() < 1e-5
    assert (out.pooled - ref.pooler_output).abs().max() < 1e-5
