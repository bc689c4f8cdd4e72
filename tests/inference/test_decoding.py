"""inference/decoding.py: the token sampler, end-of-sequence bookkeeping, the sampling and beam-search
loops."""

from __future__ import annotations

import itertools

import torch

from rosim.inference.decoding import (
    TokenSampler,
    banned_token_ids,
    beam_search,
    sample_sequences,
    seeded_generator,
    select_rows,
    tokens_until_end,
)
from rosim.inference.sampling import filter_logits, sample
from tests.helpers import one_torch_thread, tiny_model  # noqa: F401  (one_torch_thread: autouse)

PAD, START, END = 0, 1, 2  # toy vocabulary: 3.. are words


def test_tokens_until_end():
    rows, ended = tokens_until_end(torch.tensor([[5, 6, END, 7], [5, -1, -1, -1], [5, 6, 7, 8]]), END)
    assert rows == [[5, 6], [5], [5, 6, 7, 8]] and ended == [True, False, False]
    assert tokens_until_end([[END, 5]], END) == ([[]], [True])


def test_seeded_generator():
    a, b = seeded_generator(3), seeded_generator(3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    torch.manual_seed(0)
    c = torch.rand(4, generator=seeded_generator(None))
    torch.manual_seed(0)
    assert torch.equal(c, torch.rand(4, generator=seeded_generator(None)))  # unseeded follows torch's seed


def test_token_sampler_bans_tokens_and_matches_the_reference_draw():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 3
    banned = torch.tensor([0, 1, 7])
    logits[:, 7] = 100.0  # a banned token that would win every draw
    for top_p, top_k, partial in ((0.9, None, True), (0.9, None, False), (None, 5, True), (0.8, 10, True)):
        sampler = TokenSampler(top_p=top_p, top_k=top_k, temperature=0.8, generator=seeded_generator(4),
                               banned=banned, partial_sort=partial)
        got = sampler(logits.clone())
        assert not torch.isin(got, banned).any()
        ref_logits = logits.clone()
        ref_logits[:, banned] = float("-inf")
        ref = sample(filter_logits(ref_logits, top_p=top_p, top_k=top_k, temperature=0.8), seeded_generator(4))
        assert float((got == ref).float().mean()) > 0.95


def _markov_step(tables):
    """A toy model: row r's next-token logits are ``tables[r][previous token]``; the cache carries
    each beam's row id, so reordering the cache with the beams is checked too."""
    def step(tokens, t, cache):
        rows = cache[0][0].flatten().long()
        return tables[rows, tokens], cache
    return step


def _best_by_enumeration(table, max_new, banned):
    logp = torch.log_softmax(table, dim=-1)
    logp[:, banned] = float("-inf")
    words = [w for w in range(table.shape[0]) if w not in banned and w != END]
    best, best_score = None, float("-inf")
    for length in range(max_new + 1):
        for seq in itertools.product(words, repeat=length):
            path = [START, *seq, END]
            score = sum(float(logp[a, b]) for a, b in zip(path, path[1:], strict=False))
            if score > best_score:
                best, best_score = list(seq), score
    return best


def test_beam_search_finds_the_best_sequence_when_the_beam_holds_every_candidate():
    vocab, max_new, rows = 6, 3, 3
    tables = torch.randn(rows, vocab, vocab, generator=torch.Generator().manual_seed(2)) * 2
    banned = torch.tensor([PAD, START])
    k = 64  # more beams than live sequences: the search is exhaustive
    ids = torch.arange(rows).repeat_interleave(k).view(-1, 1, 1, 1).float()
    got = beam_search(_markov_step(tables), [(ids, ids)], rows=rows, beam_size=k, max_new=max_new,
                      start_id=START, end_id=END, pad_id=PAD, banned=banned)
    assert got == [_best_by_enumeration(tables[r], max_new, [PAD, START]) for r in range(rows)]
    greedy = beam_search(_markov_step(tables), [(ids[::k], ids[::k])], rows=rows, beam_size=1, max_new=max_new,
                         start_id=START, end_id=END, pad_id=PAD, banned=banned)
    for r, row in enumerate(greedy):  # greedy: each token is the best allowed one after the previous
        path = [START, *row, END][:max_new + 2]
        for t, (a, b) in enumerate(zip(path, path[1:], strict=False)):
            allowed = tables[r, a].clone()
            allowed[[PAD, START]] = float("-inf")
            if t == max_new:
                assert b == END
            else:
                assert b == int(allowed.argmax())


def test_sample_sequences_end_and_stay_reproducible():
    vocab, rows, max_new = 8, 16, 5
    tables = torch.randn(rows, vocab, vocab, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(rows).view(-1, 1, 1, 1).float()

    def run(seed):
        sampler = TokenSampler(top_p=None, top_k=None, temperature=1.0, generator=seeded_generator(seed),
                               banned=torch.tensor([PAD, START]))
        return sample_sequences(_markov_step(tables), [(ids, ids)], rows=rows, max_new=max_new, sampler=sampler,
                                start_id=START, end_id=END, pad_id=PAD, device=torch.device("cpu"))

    out = run(0)
    assert out == run(0) and out != run(1)
    assert all(len(r) <= max_new and PAD not in r and START not in r and END not in r for r in out)
    assert any(len(r) < max_new for r in out) and any(len(r) == max_new for r in out)


def test_select_rows():
    k = torch.arange(4.0).view(4, 1, 1, 1)
    kept = select_rows([None, (k, k + 10)], torch.tensor([2, 0, 0]))
    assert kept[0] is None and kept[1][0].flatten().tolist() == [2.0, 0.0, 0.0]
    assert kept[1][1].flatten().tolist() == [12.0, 10.0, 10.0]


def test_banned_token_ids():
    _, tok = tiny_model()
    assert banned_token_ids(tok).tolist() == [tok.pad_id, tok.cls_id, tok.mask_id, tok.unk_id]
