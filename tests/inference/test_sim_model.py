"""SimModel: encoding, similarity, cached generation, sampling, similar()."""

import numpy as np
import pytest
import torch

from rosim import InputError, SimModel
from rosim.inference.sampling import filter_logits, sample
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def sim():
    model, tok = tiny_model(seed=3)
    return SimModel(model, tok)


def test_encode_shapes_order_and_normalisation(sim):
    texts = ["今天天气不错", "我", "广州和深圳哪个好？科学技术是第一生产力。", "电影不错"]
    vecs = sim.encode(texts, batch_size=2)
    assert vecs.shape == (4, 32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-6)
    one_by_one = np.stack([sim.encode(t) for t in texts])
    assert np.abs(vecs - one_by_one).max() < 1e-5  # bucketing and padding change nothing
    raw = sim.encode(texts, normalize=False, convert_to="torch")
    assert isinstance(raw, torch.Tensor)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))


def test_poolings_match_direct_computation(sim):
    text = "我喜欢北京"
    enc = sim.tokenizer(text)
    with torch.no_grad():
        out = sim.model(enc.input_ids, enc.token_type_ids, enc.attention_mask, output_hidden_states=True)
    direct = {
        "pooler": out.pooled[0],
        "cls": out.last_hidden_state[0, 0],
        "mean": out.last_hidden_state[0].mean(0),
        "first-last-mean": ((out.hidden_states[1] + out.hidden_states[-1]) / 2)[0].mean(0),
    }
    for pooling, ref in direct.items():
        got = sim.encode(text, pooling=pooling, normalize=False)
        assert np.abs(got - ref.numpy()).max() < 1e-5, pooling


def test_similarity_shape_follows_the_argument_forms_not_the_lengths(sim):
    s = sim.similarity("今天天气不错", "今天天气很好")
    assert isinstance(s, float) and -1 <= s <= 1.0001
    square = sim.similarity(["我", "你"], ["他", "她"])
    assert square.shape == (2, 2)  # equal lengths: still the matrix
    mat = sim.similarity(["我", "你"], ["他", "她", "它"])
    assert mat.shape == (2, 3)
    np.testing.assert_allclose(mat[:, :2], square, atol=1e-6)
    row = sim.similarity("我", ["他", "她", "它"])
    col = sim.similarity(["他", "她", "它"], "我")
    assert row.shape == col.shape == (3,)
    np.testing.assert_allclose(row, mat[0], atol=1e-6)
    np.testing.assert_allclose(col, row, atol=1e-6)
    assert abs(s - float(sim.encode("今天天气不错") @ sim.encode("今天天气很好"))) < 1e-6


def test_similarity_pairwise(sim):
    pair = sim.similarity_pairwise(["我", "你"], ["他", "她"])
    np.testing.assert_allclose(pair, np.diag(sim.similarity(["我", "你"], ["他", "她"])), atol=1e-6)
    with pytest.raises(InputError, match="equal length, got 2 and 3"):
        sim.similarity_pairwise(["我", "你"], ["他", "她", "它"])
    with pytest.raises(InputError, match="two lists"):
        sim.similarity_pairwise("我", "他")


def test_cached_logits_equal_recompute_at_every_step(sim):
    model, tok = sim.model, sim.tokenizer
    src = tok.build_inputs(tok.encode_ids("今天天气不错"))[0]
    target = tok.encode_ids("我喜欢北京的秋天") + [tok.sep_id]
    enc = tok.pad([(src, [0] * len(src))])
    with torch.no_grad():
        res = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, use_cache=True)
        past = res.past_key_values
        cached = [model.lm_logits(res.last_hidden_state[:, -1])]
        mask = enc.attention_mask
        for t, token in enumerate(target[:-1]):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            step = model(torch.tensor([[token]]), torch.ones(1, 1, dtype=torch.long), mask,
                         position_ids=torch.tensor([[len(src) + t]]), past_key_values=past, use_cache=True)
            past = step.past_key_values
            cached.append(model.lm_logits(step.last_hidden_state[:, -1]))
        full_ids = torch.tensor([src + target])
        types = torch.tensor([[0] * len(src) + [1] * len(target)])
        full = model(full_ids, types, mask="unilm")
        ref = model.lm_logits(full.last_hidden_state[0, len(src) - 1:-1])
    assert (torch.cat(cached) - ref).abs().max() < 1e-5


def test_preallocated_cache_equals_recompute_and_drops_rows(sim):
    from rosim.modeling.model import KVCache

    model, tok = sim.model, sim.tokenizer
    srcs = [tok.build_inputs(tok.encode_ids(t))[0] for t in ("今天天气不错", "广州和深圳哪个好？")]
    target = tok.encode_ids("我喜欢北京的秋天")
    enc = tok.pad([(s_, [0] * len(s_)) for s_ in srcs])
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        res = model(enc.input_ids, enc.token_type_ids, enc.attention_mask, use_cache=True)
        cache = KVCache(res.past_key_values, capacity=width + len(target))
        mask = torch.ones(2, width + len(target), dtype=torch.long)
        mask[:, :width] = enc.attention_mask
        rows = torch.arange(2)
        for t, token in enumerate(target):
            if t == 3:  # row 0 finishes: it leaves the batch and the cache
                rows, mask = rows[1:], mask[1:]
                cache.select(torch.tensor([1]))
            pos = torch.tensor([len(srcs[r]) + t for r in rows.tolist()])[:, None]
            step = model(torch.full((len(rows), 1), token), torch.ones(len(rows), 1, dtype=torch.long),
                         mask[:, :width + t + 1], position_ids=pos, past_key_values=cache, use_cache=True,
                         validate=False)
            assert step.past_key_values is cache and cache.length == width + t + 1
        got = model.lm_logits(step.last_hidden_state[:, -1])
        full_ids = torch.tensor([srcs[1] + target])
        types = torch.tensor([[0] * len(srcs[1]) + [1] * len(target)])
        ref = model.lm_logits(model(full_ids, types, mask="unilm").last_hidden_state[:, -1])
    assert (got - ref).abs().max() < 1e-5
    with pytest.raises(InputError, match="does not fit"):
        model(torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_sample_top_p_matches_the_sort_based_sampler():
    """The partial-top-k nucleus sampler draws from exactly the nucleus of the reference (every
    token inside it) and, with the same generator state, the same token (up to last-bit ties)."""
    from rosim.inference.sampling import sample_top_p

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(200, 2000, generator=g) * s for s in (0.5, 1.5, 2.0, 3.0, 5.0, 12.0)])
    logits[:50] = 0.0  # uniform rows: the nucleus is far wider than every candidate width (full sort)
    for top_p in (0.5, 0.9, 0.95):
        ref_logp = filter_logits(logits, top_p=top_p)
        width = torch.isfinite(ref_logp).sum(-1)
        if top_p == 0.95:  # every path is taken: within 64, within 512, wider than 512
            assert bool((width <= 60).any() and ((width > 70) & (width < 500)).any() and (width > 512).any())
        ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        fast = sample_top_p(logits, top_p, generator=ga)
        ref = sample(ref_logp, gb)
        inside = torch.isfinite(ref_logp.gather(-1, fast[:, None])).squeeze(-1)
        assert bool(inside.all())
        assert float((fast == ref).float().mean()) > 0.995
        assert torch.equal(ga.get_state(), gb.get_state())  # same draws consumed


def test_cached_and_recompute_generate_identical_samples(sim):
    texts = ["今天天气不错", "广州和深圳哪个好？"]
    a = sim.generate(texts, 6, seed=11, max_new_tokens=12, top_p=0.9)
    b = sim.generate(texts, 6, seed=11, max_new_tokens=12, top_p=0.9, strategy="recompute")
    assert a == b
    assert sim.generate(texts, 6, seed=11, max_new_tokens=12) == sim.generate(texts, 6, seed=11, max_new_tokens=12)
    assert sim.generate(texts, 6, seed=12, max_new_tokens=12) != sim.generate(texts, 6, seed=11, max_new_tokens=12)


def test_nucleus_keeps_tokens_up_to_and_including_the_crossing_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logp = filter_logits(probs.log(), top_p=0.79)
    kept = torch.isfinite(logp)[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.79, 0.5+0.3 crosses: kept
    # (0.8 itself is no boundary test here: 0.3 has no exact float, see the dyadic cases below)
    logp = filter_logits(probs.log(), top_p=0.81)
    assert torch.isfinite(logp)[0].tolist() == [True, True, True, False]
    logp = filter_logits(probs.log(), top_p=0.4)
    assert torch.isfinite(logp)[0].tolist() == [True, False, False, False]
    assert torch.allclose(logp.exp().sum(), torch.tensor(1.0))
    topk = filter_logits(probs.log(), top_k=2)
    assert torch.allclose(topk.exp(), torch.tensor([[0.625, 0.375, 0, 0]]))
    hot = filter_logits(probs.log(), temperature=0.5).exp()
    assert torch.allclose(hot, probs**2 / (probs**2).sum())


def _nucleus_reference(probs: torch.Tensor, top_p: float) -> list[bool]:
    """Exact arithmetic (fractions) on the same float32 probabilities: keep tokens, most probable
    first, while the mass before them is below p (ties keep sort order)."""
    from fractions import Fraction

    values = probs.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    keep, before, p = [False] * len(values), Fraction(0), Fraction(top_p)
    for i in order:
        if before >= p:
            break
        keep[i] = True
        before += Fraction(values[i])
    return keep


@pytest.mark.parametrize("probs, top_p, n_kept", [
    ([0.5, 0.25, 0.25], 0.5, 1), ([0.5, 0.25, 0.25], 0.75, 2), ([0.5, 0.25, 0.125, 0.125], 0.875, 3),
    ([0.25, 0.25, 0.25, 0.25], 0.5, 2), ([0.5, 0.25, 0.125, 0.0625, 0.0625], 0.9375, 4),
])
def test_nucleus_is_exact_at_dyadic_boundaries(probs, top_p, n_kept):
    logits = torch.tensor([probs]).log()
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))[0]
    assert int(kept.sum()) == n_kept
    assert kept.tolist() == _nucleus_reference(torch.log_softmax(logits, -1).exp()[0], top_p)


def test_nucleus_mass_is_exact_over_long_tails():
    # 0.5, 0.25, then 2^16 tokens of 2^-18: with p = 0.75 + 2^-18 the mass before the 4th token is
    # 0.75 + 2^-18 = p, so exactly 4 tokens stay; a float32 running sum (and "cumsum - p") drifts
    # over the long tail and kept 3 (the decoder before this test).
    probs = torch.tensor([[0.5, 0.25] + [2.0**-18] * 2**16])
    top_p = 0.75 + 2.0**-18
    kept = torch.isfinite(filter_logits(probs.log(), top_p=top_p))[0]
    assert int(kept.sum()) == 4
    assert kept.tolist() == _nucleus_reference(torch.log_softmax(probs.log(), -1).exp()[0], top_p)


def test_nucleus_matches_exact_reference_on_random_distributions():
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        logits = torch.randn(1, 40, generator=g) * (1 + trial % 4)
        top_p = (0.9, 0.95, 0.5)[trial % 3]
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))[0].tolist()
        assert kept == _nucleus_reference(torch.log_softmax(logits, -1).exp()[0], top_p), trial


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logp = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logp, g), minlength=3).float() / 20000
    assert torch.allclose(counts, probs, atol=0.015)


def _fake_generation(sim, monkeypatch, outs: list[str]):
    """Make the generator return ``outs`` (as ids) for every source."""
    rows = [sim.tokenizer.encode_ids(o) for o in outs]

    def chunks(src, settings, with_fluency=False):
        order = list(range(len(src)))
        yield order, [list(r) for _ in order for r in rows], None

    monkeypatch.setattr(sim, "_generate_chunks", chunks)


def test_similar_dedups_drops_input_and_ranks(sim, monkeypatch):
    _fake_generation(sim, monkeypatch, ["今天天气很好", "今天天气不错", "今天天气很好", "天气不错", ""])
    res = sim.similar("今天天气不错", n=5, k=5)
    texts = [t for t, _ in res]
    assert sorted(texts) == ["今天天气很好", "天气不错"]
    scores = [s for _, s in res]
    assert scores == sorted(scores, reverse=True)
    v = sim.encode(["今天天气不错", texts[0]])
    assert abs(scores[0] - float(v[0] @ v[1])) < 1e-5
    batch = sim.similar(["今天天气不错", "我喜欢北京"], n=5, k=1)
    assert len(batch) == 2 and all(len(r) == 1 for r in batch)


def test_fluency_is_the_mean_target_log_probability(sim):
    import torch.nn.functional as F

    got = sim.fluency(["今天天气不错", "我喜欢北京"], ["天气很好", "我爱北京天安门"])
    for i, (a, b) in enumerate([("今天天气不错", "天气很好"), ("我喜欢北京", "我爱北京天安门")]):
        enc = sim.tokenizer([a], [b])
        with torch.no_grad():
            h = sim.model(enc.input_ids, enc.token_type_ids, enc.attention_mask, mask="unilm").last_hidden_state
            logits = sim.model.lm_logits(h)[0]
        n_src = int((enc.token_type_ids[0] == 0).sum())
        targets = enc.input_ids[0, n_src:]
        expected = -F.cross_entropy(logits[n_src - 1:-1], targets)
        assert abs(got[i] - float(expected)) < 1e-5
    with pytest.raises(InputError, match="as many sources"):
        sim.fluency(["a"], ["b", "c"])


def test_repetition_detector():
    from rosim.inference.sim_model import repeats_more_than_source as rep

    assert rep("广州和深圳哪个好？", "广州哪个广州和深圳最好？")
    assert rep("广州和深圳哪个好？", "深圳和深圳哪个好？")
    assert not rep("广州和深圳哪个好？", "深圳和广州哪个好？")
    assert not rep("广州和深圳哪个好？", "广州好还是深圳好？")
    assert not rep("谢谢谢谢", "谢谢谢谢")  # as often as in the input
    assert not rep("天天向上", "每天都向上")


def test_fluency_guard_ranks_failing_candidates_last(sim, monkeypatch):
    outs = [["今天天气很好", "今天天气今天天气", "天气不错", "天气很好"]]
    _fake_generation(sim, monkeypatch, outs[0])
    off = [t for t, _ in sim.similar("今天天气不错", n=4, k=4, min_fluency=None)]
    scores = dict(zip(outs[0], sim.fluency(["今天天气不错"] * 4, outs[0]), strict=True))
    threshold = sorted(scores.values())[1]  # the lowest-scoring candidate fails, the others pass
    on = [t for t, _ in sim.similar("今天天气不错", n=4, k=4, min_fluency=threshold)]
    failing = {t for t, f in scores.items() if f < threshold} | {"今天天气今天天气"}
    assert set(on) == set(off)
    assert set(on[-len(failing):]) == failing  # failing ones last
    passing = [t for t in off if t not in failing]
    assert on[:len(passing)] == passing  # the rest keep their cosine order
    loose = [t for t, _ in sim.similar("今天天气不错", n=4, k=4, min_fluency=-1e9)]
    assert loose[-1] == "今天天气今天天气"  # a repetition fails whatever the log-probability


def test_mask_idxs_replaces_source_positions(sim):
    src = sim._prepare_sources(sim.tokenizer.encode_batch_ids(["科学技术是第一生产力。"]), [6, 7])[0]
    assert src[6] == src[7] == sim.tokenizer.mask_id
    with pytest.raises(InputError, match="mask index 40"):
        sim.generate("科学", 2, mask_idxs=[40])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.encode(""), "empty"),
        (lambda s: s.encode("   "), "empty"),
        (lambda s: s.encode([]), "no texts"),
        (lambda s: s.generate("你好", 0), "n must be"),
        (lambda s: s.generate("你好", 2, top_p=0), "top_p"),
        (lambda s: s.generate("你好", 2, top_p=1.5), "top_p"),
        (lambda s: s.generate("你好", 2, temperature=0), "temperature"),
        (lambda s: s.similar("你好", n=3, k=5), "cannot exceed"),
        (lambda s: s.similar("你好", n=3, k=0), "k must be"),
        (lambda s: s.generate("你好", 10**9), "n must be in 1..1000"),
        (lambda s: s.similar("你好", n=99999999999999999999999), "n must be in"),
        (lambda s: s.similar("你好", n=-1), "n must be in"),
        (lambda s: s.similar("你好", n=2.5), "n must be an integer"),
        (lambda s: s.similar("你好", n=4, seed=2**70), "seed must be in"),
        (lambda s: s.similar("你好", n=4, seed=-1), "seed must be in"),
        (lambda s: s.generate("你好", 2, max_new_tokens=0), "max_new_tokens must be in"),
        (lambda s: s.generate("你好", 2, max_new_tokens=10**6), "max_new_tokens must be in"),
        (lambda s: s.similar(["你好", ""], n=2), "text 1 is empty"),
        (lambda s: s.similarity("你好", []), "no texts"),
        (lambda s: s.encode(["a", 3]), "expected str"),
        (lambda s: s.encode("a", pooling="max"), "pooling"),
    ],
)
def test_bad_input(sim, call, message):
    with pytest.raises(InputError, match=message):
        call(sim)


def test_long_text_is_truncated_and_unknown_characters_are_unk(sim):
    long = "天" * 500
    assert sim.encode(long).shape == (32,)
    assert np.allclose(sim.encode(long), sim.encode("天" * 62), atol=1e-6)  # documented: first 62 tokens
    ids = sim.tokenizer.encode_ids("龘")
    assert ids == [sim.tokenizer.unk_id]
    assert len(sim.generate("天" * 500, 2, max_new_tokens=4, seed=0)) == 2


def test_generation_in_bounded_groups_matches_one_group_per_source(sim):
    texts = ["今天天气不错", "我喜欢北京的秋天", "你好", "科学技术是第一生产力。"]
    whole = sim.generate(texts, 6, seed=5, max_new_tokens=8, max_rows=6)  # one source per group
    again = sim.generate(texts, 6, seed=5, max_new_tokens=8, max_rows=6)
    assert whole == again and [len(x) for x in whole] == [6] * 4
    one = sim.generate("你好", 6, seed=5, max_new_tokens=8, max_rows=6)  # shortest source runs first
    assert whole[2] == one
    split = sim.generate("你好", 7, seed=5, max_new_tokens=8, max_rows=3)  # n beyond max_rows: in parts
    assert len(split) == 7
    assert split[:3] == sim.generate("你好", 3, seed=5, max_new_tokens=8)


def test_similar_default_k_is_at_most_n_and_results_are_typed(sim):
    from rosim.inference.sim_model import Candidate

    res = sim.similar("今天天气不错", n=6, seed=0, max_new_tokens=6)
    assert 0 < len(res) <= 6 and all(isinstance(c, Candidate) for c in res)
    text, score = res[0]
    assert res[0].text == text and res[0].score == score


def test_similar_scores_candidates_from_their_ids(sim, monkeypatch):
    seen = []
    real = sim._encode_ids
    monkeypatch.setattr(sim, "encode", lambda *a, **k: pytest.fail("similar re-tokenised text"))
    monkeypatch.setattr(sim, "_encode_ids", lambda ids, **kw: seen.append(ids) or real(ids, **kw))
    res = sim.similar(["今天天气不错", "你好"], n=4, k=2, seed=1, max_new_tokens=6)
    assert len(res) == 2 and seen


def test_fluency_read_off_the_decoder_equals_teacher_forcing(sim):
    srcs = sim._prepare_sources(sim._source_ids(["今天天气不错", "广州和深圳哪个好？"]), None)
    settings = sim._sampling_settings(64, 0.95, None, 1.0, 40, 5, "cache", 512)
    rows, fluency = sim._generate_ids(srcs, 64, settings, with_fluency=True)
    ended = ~np.isnan(fluency)
    assert 10 < ended.sum() < len(rows)  # both kinds occur: rows that sampled [SEP] and rows cut at 40 tokens
    assert all(len(r) == 40 for r, e in zip(rows, ended, strict=True) if not e)
    src_ids = sim._source_ids(["今天天气不错", "广州和深圳哪个好？"])
    owners = [src_ids[i // 64] for i in range(len(rows))]
    ref = sim._fluency_ids(owners, rows)
    np.testing.assert_allclose(fluency[ended], ref[ended], atol=1e-4)


def test_similar_ranks_the_same_with_fluency_from_the_decoder(sim, monkeypatch):
    texts = ["今天天气不错", "我喜欢北京"]
    fast = sim.similar(texts, n=30, k=10, seed=3, max_new_tokens=12, min_fluency=-4.0)
    original = sim._generate_chunks

    def without(src, settings, with_fluency=False):  # the generator does not report fluency: _rank computes it
        for chunk, rows, _ in original(src, settings):
            yield chunk, rows, None

    monkeypatch.setattr(sim, "_generate_chunks", without)
    slow = sim.similar(texts, n=30, k=10, seed=3, max_new_tokens=12, min_fluency=-4.0)
    assert [[c.text for c in r] for r in fast] == [[c.text for c in r] for r in slow]
    np.testing.assert_allclose([c.score for r in fast for c in r], [c.score for r in slow for c in r], atol=1e-6)


def test_top_p_of_one_samples_the_whole_distribution():
    """top_p=1 keeps every token: no candidate width applies and every row takes the full path
    (5780a64 raised ValueError from a strict zip there: a 500 over HTTP)."""
    from rosim.inference.sampling import sample_top_p

    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    got = sample_top_p(logits, 1.0, generator=torch.Generator().manual_seed(1))
    want = sample(filter_logits(logits, top_p=1.0), torch.Generator().manual_seed(1))
    assert torch.equal(got, want)
    sim = SimModel(*tiny_model(seed=3))
    assert len(sim.similar("今天天气不错", 6, 3, top_p=1.0, seed=1, max_new_tokens=4)) == 3
