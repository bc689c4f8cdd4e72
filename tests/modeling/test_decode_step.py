"""RoFormerSim.decode_step: new positions against the key/value cache give the full pass's logits."""

from __future__ import annotations

import pytest
import torch

from rosim.errors import InputError
from rosim.modeling.model import KVCache, rotary_cos_sin
from tests.helpers import one_torch_thread, tiny_model  # noqa: F401  (one_torch_thread: autouse)

SOURCES = ["今天天气不错", "广州和深圳哪个好？"]
TARGET = "我喜欢北京的秋天"


def _full_logits(model, tok, source, target):
    """Teacher-forced logits of the UniLM pass over ``[CLS] source [SEP] target``: row i predicts
    token i + 1, so ``[n_src - 1:]`` are the logits after the source and after each target token."""
    src = tok.build_inputs(tok.encode_ids(source))[0]
    ids = torch.tensor([src + target])
    types = torch.tensor([[0] * len(src) + [1] * len(target)])
    return model.lm_logits(model(ids, types, mask="unilm").last_hidden_state[0, len(src) - 1:])


@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_decode_step_over_a_prefix_equals_the_full_forward(position):
    model, tok = tiny_model(seed=4, position=position)
    target = tok.encode_ids(TARGET)
    src = tok.build_inputs(tok.encode_ids(SOURCES[0]))[0]
    with torch.no_grad():
        full = _full_logits(model, tok, SOURCES[0], target)
        prefill = model(torch.tensor([src]), torch.zeros(1, len(src), dtype=torch.long), use_cache=True)
        cache = prefill.past_key_values
        for t, token in enumerate(target):  # one token at a time, a tuple of per-layer pairs
            logits, cache = model.decode_step(torch.tensor([[token]]), position_ids=torch.tensor([[len(src) + t]]),
                                              cache=cache)
            assert (logits[0] - full[t + 1]).abs().max() < 1e-5
        assert cache[0][0].shape[2] == len(src) + len(target)
        # the whole prefix in one call: causal among the new positions, every cached key visible
        whole, cache = model.decode_step(torch.tensor([target]), position_ids=len(src) + torch.arange(len(target))[None],
                                         cache=prefill.past_key_values)
        assert (whole[0] - full[-1]).abs().max() < 1e-5
        assert len(cache) == model.config.num_layers


def test_decode_step_with_a_preallocated_cache_and_padded_sources():
    model, tok = tiny_model(seed=5)
    target = tok.encode_ids(TARGET)
    srcs = [tok.build_inputs(tok.encode_ids(s))[0] for s in SOURCES]
    enc = tok.pad([(s, [0] * len(s)) for s in srcs])
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        res = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, use_cache=True)
        cache = KVCache(res.past_key_values, capacity=width + len(target))
        key_mask = torch.cat([enc.attention_mask, torch.ones(2, len(target), dtype=torch.long)], dim=1)
        lengths = torch.tensor([len(s) for s in srcs])
        fulls = [_full_logits(model, tok, s, target) for s in SOURCES]
        for t, token in enumerate(target):
            logits, same = model.decode_step(torch.full((2, 1), token), position_ids=(lengths + t)[:, None],
                                             cache=cache, attention_mask=key_mask[:, :width + t + 1])
            assert same is cache and cache.length == width + t + 1
            for row in range(2):
                assert (logits[row] - fulls[row][t + 1]).abs().max() < 1e-5


def test_layer_input_hook_and_a_cache_whose_layers_differ_in_length():
    """The hook sees each layer's input in order and may replace it; a layer given no earlier keys
    (None) attends to the new position alone, as UniVAE's independent layers do."""
    model, tok = tiny_model(seed=6, num_layers=3)
    seen = []

    def hook(i, x):
        seen.append(i)
        return x * 2 if i == 1 else x

    ids = torch.tensor([[tok.cls_id, 10, 11]])
    with torch.no_grad():
        prefill = model.decode_step(ids, position_ids=torch.arange(3)[None], token_type_ids=torch.zeros_like(ids),
                                    layer_input=hook).cache
        assert seen == [0, 1, 2]
        ragged = [None, prefill[1], prefill[2]]
        step = model.decode_step(torch.tensor([[12]]), position_ids=torch.tensor([[3]]), cache=ragged)
        assert [kv[0].shape[2] for kv in step.cache] == [1, 4, 4]
        # the same step through the layers by hand: layer 0 without a cache, then the cached layers
        x = model.embeddings(torch.tensor([[12]]), torch.ones(1, 1, dtype=torch.long), torch.tensor([[3]]))
        rope = rotary_cos_sin(torch.tensor([[3]]), model.config.head_size, model.config.rotary_base)
        for layer, past in zip(model.layers, ragged, strict=True):
            x, _ = layer(x, None, rope, past)
        assert torch.equal(step.logits, model.lm_logits(x[:, -1]))
        with pytest.raises(InputError, match="same number of positions"):
            model.decode_step(torch.tensor([[12]]), position_ids=torch.tensor([[3]]), cache=ragged,
                              attention_mask=torch.ones(1, 4, dtype=torch.long))
        with pytest.raises(InputError, match="the cache has 2 layers, the model 3"):
            model.decode_step(torch.tensor([[12]]), position_ids=torch.tensor([[3]]), cache=prefill[:2])
        with pytest.raises(InputError, match=r"attention_mask must be \(batch, cached \+ new\)"):
            model.decode_step(torch.tensor([[12]]), position_ids=torch.tensor([[3]]), cache=prefill,
                              attention_mask=torch.ones(1, 3, dtype=torch.long))
