"""Whole-word masking: rates, whole words, clean targets, seeds."""

import numpy as np
import pytest

from rosim.errors import InputError
from rosim.training.data import PairBatcher
from rosim.training.noise import WholeWordMasking, jieba_cut, noisy_source_ids
from tests.helpers import SENTENCES, tiny_tokenizer

TEXT = "科学技术是第一生产力，今天天气不错，我喜欢北京"


def test_rates_and_whole_words():
    tok = tiny_tokenizer()
    masker = WholeWordMasking(tok)
    words = [w for w in jieba_cut(TEXT) if tok.encode_ids(w)]
    clean = tok.encode_ids(TEXT)
    rng = np.random.default_rng(0)
    masked_words = kept = changed = 0
    n_words = 0
    for _ in range(600):
        ids, selected = masker(TEXT, rng)
        assert len(ids) == len(clean) == len(selected)
        pos = 0
        for w in words:
            n = len(tok.encode_ids(w))
            seg, sel = ids[pos:pos + n], selected[pos:pos + n]
            assert len(set(sel)) == 1, "selection is per whole word"
            n_words += 1
            if sel[0]:
                if all(i == tok.mask_id for i in seg):
                    masked_words += 1
                elif seg == clean[pos:pos + n]:
                    kept += 1
                else:
                    changed += 1
            else:
                assert seg == clean[pos:pos + n]
            pos += n
    picked = masked_words + kept + changed
    assert abs(picked / n_words - 0.15) < 0.02
    assert abs(masked_words / picked - 0.8) < 0.05
    assert 0.05 < kept / picked < 0.16 and 0.04 < changed / picked < 0.16  # random tokens may equal the originals


def test_seeded_and_rows_half_noised_targets_clean():
    tok = tiny_tokenizer()
    batcher = PairBatcher(tok, maxlen=32, seed=3)
    pairs = [(SENTENCES[i], SENTENCES[i + 1]) for i in range(0, 8, 2)] * 25
    b1, b2 = batcher(pairs, step=7), batcher(pairs, step=7)
    assert (b1.encoding.input_ids == b2.encoding.input_ids).all()
    assert not (batcher(pairs, step=8).encoding.input_ids == b1.encoding.input_ids).all()
    assert 0.4 < np.mean(b1.noised) < 0.6
    enc = b1.encoding
    for r in range(enc.input_ids.shape[0]):
        ids, types, att = enc.input_ids[r], enc.token_type_ids[r], enc.attention_mask[r]
        target = ids[(types == 1) & (att == 1)].tolist()
        src, tgt = pairs[r // 2] if r % 2 == 0 else pairs[r // 2][::-1]
        assert target == tok.encode_ids(tgt) + [tok.sep_id]  # targets always clean
        source = ids[(types == 0) & (att == 1)].tolist()[1:-1]
        if not b1.noised[r]:
            assert source == tok.encode_ids(src)
        assert tok.mask_id not in target


def test_row_prob_extremes_and_bad_args():
    tok = tiny_tokenizer()
    masker = WholeWordMasking(tok)
    rng = np.random.default_rng(0)
    assert noisy_source_ids(masker, TEXT, rng, row_prob=0.0) == (tok.encode_ids(TEXT), False)
    assert noisy_source_ids(masker, TEXT, rng, row_prob=1.0)[1] is True
    with pytest.raises(InputError, match="word_prob"):
        WholeWordMasking(tok, word_prob=1.5)
    with pytest.raises(InputError, match="mask_prob"):
        WholeWordMasking(tok, mask_prob=0.9, keep_prob=0.2)
