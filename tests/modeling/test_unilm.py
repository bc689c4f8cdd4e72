"""The UniLM mask, checked by perturbing inputs, and the key/value cache for incremental decoding."""

from __future__ import annotations

import pytest
import torch

from rosim.errors import InputError
from rosim.modeling.model import build_attention_bias, unilm_allowed
from tests.helpers import tiny_model

SOURCE = "今天天气不错"


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(seed=7)
    return model, tok


def _pair(tok, source, target):
    enc = tok(source, target)
    return enc.input_ids, enc.token_type_ids


def test_unilm_visibility_matrix():
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    allowed = unilm_allowed(types)[0, 0].int()
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(allowed, expected)


def test_source_and_cls_ignore_whatever_target_follows(model_tok):
    model, tok = model_tok
    n_src = len(tok.encode_ids(SOURCE)) + 2
    with torch.no_grad():
        enc = tok(SOURCE)
        alone = model(enc.input_ids, enc.token_type_ids)  # bidirectional, source only
        outs = []
        for target in ["今天天气很好", "我", "广州和深圳哪个好？科学技术是第一生产力。", "hello world 123"]:
            ids, types = _pair(tok, SOURCE, target)
            outs.append(model(ids, types, mask="unilm"))
    for out in outs:
        # every source position (and so the [CLS] sentence vector) equals encoding the source alone
        assert (out.last_hidden_state[:, :n_src] - alone.last_hidden_state).abs().max() < 1e-5
        assert (out.pooled - alone.pooled).abs().max() < 1e-5
    # random target ids too, same lengths
    ids, types = _pair(tok, SOURCE, "今天天气很好")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        noisy = ids.clone()
        noisy[:, n_src:-1] = torch.randint(5, len(tok), (1, ids.shape[1] - n_src - 1), generator=g)
        with torch.no_grad():
            out = model(noisy, types, mask="unilm")
        assert torch.equal(out.last_hidden_state[:, :n_src], outs[0].last_hidden_state[:, :n_src])


def test_target_sees_only_source_and_earlier_targets(model_tok):
    model, tok = model_tok
    ids, types = _pair(tok, SOURCE, "今天天气很好")
    n_src = int((types[0] == 0).sum())
    with torch.no_grad():
        base = model(ids, types, mask="unilm").last_hidden_state
        for k in range(n_src, ids.shape[1]):
            changed = ids.clone()
            changed[0, k] = tok.vocab["北"] if ids[0, k] != tok.vocab["北"] else tok.vocab["京"]
            out = model(changed, types, mask="unilm").last_hidden_state
            diff = (out - base).abs().amax(-1)[0]
            assert diff[:k].max() < 1e-5, f"position < {k} saw target token {k}"
            assert diff[k:].min() > 1e-4, f"positions >= {k} did not see target token {k}"
        # and every target position sees the source
        changed = ids.clone()
        changed[0, 2] = tok.vocab["北"]
        out = model(changed, types, mask="unilm").last_hidden_state
        assert (out - base).abs().amax(-1)[0, n_src:].min() > 1e-4


def test_unilm_with_padding_in_the_batch(model_tok):
    model, tok = model_tok
    enc = tok([SOURCE, "我喜欢北京"], ["今天天气很好", "好"])
    with torch.no_grad():
        batch = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, mask="unilm").last_hidden_state
        one = model(*_pair(tok, "我喜欢北京", "好"), mask="unilm").last_hidden_state
    n = one.shape[1]
    assert (batch[1, :n] - one[0]).abs().max() < 1e-5


def _incremental(model, ids, types, n_src, *, with_mask, chunk=1, mask="unilm"):
    out = model(ids[:, :n_src], types[:, :n_src], mask=mask, use_cache=True)
    hidden, past = [out.last_hidden_state], out.past_key_values
    for start in range(n_src, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        attn = torch.ones(ids.shape[0], end, dtype=torch.long) if with_mask else None
        out = model(ids[:, start:end], types[:, start:end], attn, mask=mask, past_key_values=past, use_cache=True)
        assert out.pooled is None  # the sentence vector comes from the first pass only
        hidden.append(out.last_hidden_state)
        past = out.past_key_values
    return torch.cat(hidden, dim=1), past


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_equals_full_recompute(model_tok, with_mask, chunk):
    model, tok = model_tok
    ids, types = _pair(tok, SOURCE, "广州和深圳哪个好？")
    n_src = int((types[0] == 0).sum())
    with torch.no_grad():
        full = model(ids, types, mask="unilm").last_hidden_state
        inc, past = _incremental(model, ids, types, n_src, with_mask=with_mask, chunk=chunk)
        assert (inc - full).abs().max() < 1e-5
        assert (model.lm_logits(inc) - model.lm_logits(full)).abs().max() < 1e-4
    assert past[0][0].shape == (1, 4, ids.shape[1], 8)  # (B, heads, S, head size), keys rotated


def test_kv_cache_causal_and_absolute(model_tok):
    bert, tok = tiny_model(seed=2, position="absolute")
    ids, types = _pair(tok, SOURCE, "我喜欢北京")
    n_src = int((types[0] == 0).sum())
    with torch.no_grad():
        # causal: any prefix may be cached; UniLM: the first pass must hold the whole (bidirectional) source
        for model, mask, first in ((model_tok[0], "causal", 3), (bert, "unilm", n_src), (bert, "causal", 3)):
            full = model(ids, types, mask=mask).last_hidden_state
            inc, _ = _incremental(model, ids, types, first, with_mask=False, chunk=2, mask=mask)
            assert (inc - full).abs().max() < 1e-5


def test_wrong_shapes_are_input_errors(model_tok):
    model, tok = model_tok
    ids, types = _pair(tok, SOURCE, "很好")
    with pytest.raises(InputError, match="attention_mask must be"):
        model(ids, types, torch.ones(1, 3, dtype=torch.long))
    out = model(ids[:, :4], types[:, :4], use_cache=True)
    with pytest.raises(InputError, match=r"attention_mask must be \(batch, past \+ length\)"):
        model(ids[:, 4:5], types[:, 4:5], torch.ones(1, 1, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(InputError, match="token_type_ids has shape"):
        model(ids, types[:, :3])
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 120\)"):
        model(ids + 1000, types)
    with pytest.raises(InputError, match="segment ids"):
        model(ids, types + 2)
    with pytest.raises(InputError, match="length 0"):
        model(ids[:, :0])
    with pytest.raises(InputError, match="needs token_type_ids"):
        build_attention_bias(None, query_length=3, mask="unilm")


def test_mean_sentence_pooling_under_unilm_is_the_source_alone():
    """config.sentence_pooling='mean': pooled is the mean over segment 0, so in a UniLM training row
    it equals the vector of the source encoded on its own (what training and encode must share)."""
    model, tok = tiny_model(sentence_pooling="mean", with_pooler=False)
    pair = tok(["今天天气不错"], ["今天天气很好"])
    alone = tok(["今天天气不错"])
    with torch.no_grad():
        a = model(pair.input_ids, pair.token_type_ids, pair.attention_mask, mask="unilm").pooled
        b = model(alone.input_ids, alone.token_type_ids, alone.attention_mask).pooled
        h = model(alone.input_ids, alone.token_type_ids, alone.attention_mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, h.mean(1))
    assert model.has_sentence_vector and model.pooler is None
