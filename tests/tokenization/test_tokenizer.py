"""The char-level tokenizer: splitting, pairs, truncation, padding, decoding, vocabularies."""

from __future__ import annotations

import pytest
import torch

from rosim.errors import InputError
from rosim.tokenization.tokenizer import SPECIAL_TOKENS, CharTokenizer, build_vocab
from tests.helpers import SENTENCES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(build_vocab([*SENTENCES, "Hello hello, WORLD world!", "中文，标点。"], max_size=300))


def test_each_cjk_character_is_a_token(tok):
    assert tok.tokenize("今天天气不错") == ["今", "天", "天", "气", "不", "错"]
    assert tok.tokenize("我喜欢北京") == list("我喜欢北京")


def test_lowercasing_and_punctuation(tok):
    assert tok.tokenize("HELLO World") == ["hello", "world"]
    assert tok.tokenize("中文，标点。hello!") == ["中", "文", "，", "标", "点", "。", "hello", "!"]
    assert tok.tokenize("广州和深圳哪个好？") [-1] == "？"
    cased = CharTokenizer(list(tok.vocab), lowercase=False)
    assert cased.tokenize("WORLD") != tok.tokenize("WORLD")


def test_unknown_characters_become_unk(tok):
    assert tok.tokenize("鑫") == ["[UNK]"]
    assert tok.encode_ids("鑫") == [tok.unk_id]


def test_pair_encoding_and_segment_ids(tok):
    enc = tok("今天", "很好")
    ids = enc.input_ids[0].tolist()
    assert ids == [tok.cls_id, *tok.encode_ids("今天"), tok.sep_id, *tok.encode_ids("很好"), tok.sep_id]
    assert enc.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert enc.attention_mask[0].tolist() == [1] * 7


def test_batch_padding(tok):
    enc = tok(["今天天气不错", "好"])
    assert enc.input_ids.shape == (2, 8)
    assert enc.input_ids[1].tolist() == [tok.cls_id, *tok.encode_ids("好"), tok.sep_id] + [tok.pad_id] * 5
    assert enc.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert enc.input_ids.dtype == torch.long


def test_truncation_is_documented_behaviour(tok):
    long = "今天天气不错" * 30  # 180 characters
    enc = tok(long, max_length=10)
    assert enc.input_ids.shape == (1, 10)  # [CLS] + the first 8 characters + [SEP]
    assert enc.input_ids[0, 1:-1].tolist() == tok.encode_ids(long)[:8]
    assert enc.input_ids[0, -1] == tok.sep_id
    # pairs: longest first, both keep something
    enc = tok("今天天气不错今天天气不错", "很好", max_length=9)
    assert enc.input_ids.shape == (1, 9)
    assert enc.token_type_ids[0].tolist() == [0] * 6 + [1] * 3
    enc = tok("今天天气不错", "我喜欢北京我喜欢北京", max_length=9)
    assert enc.token_type_ids[0].tolist() == [0] * 5 + [1] * 4
    assert tok(long, max_length=None).input_ids.shape == (1, 182)
    with pytest.raises(InputError, match="no room"):
        tok("今天", max_length=2)


def test_over_long_text_through_the_model():
    """With truncation, any text fits; without it, an absolute-position model says what is wrong."""
    model, tok = tiny_model(position="absolute")  # max_position 128
    long = "今天天气不错" * 40
    enc = tok(long, max_length=128)
    assert model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled.shape == (1, 32)
    enc = tok(long, max_length=None)
    with pytest.raises(InputError, match="exceeds max_position 128; truncate"):
        model(enc.input_ids, enc.token_type_ids, enc.attention_mask)


def test_empty_string_is_cls_sep(tok):
    """Documented: an empty (or blank) text encodes to [CLS] [SEP]; its vector is well defined."""
    for text in ("", "   "):
        enc = tok(text)
        assert enc.input_ids[0].tolist() == [tok.cls_id, tok.sep_id]
    model, tok2 = tiny_model()
    enc = tok2(["", "今天"])
    out = model(enc.input_ids, enc.token_type_ids, enc.attention_mask)
    assert torch.isfinite(out.pooled).all()
    assert tok2.decode(tok2("").input_ids[0]) == ""


def test_bad_inputs(tok):
    with pytest.raises(InputError, match="expected strings"):
        tok(["今天", None])
    with pytest.raises(InputError, match="expected a string"):
        tok.encode_ids(3)
    with pytest.raises(InputError, match="2 texts but 1 pair"):
        tok(["a", "b"], ["c"])
    with pytest.raises(InputError, match="empty batch"):
        tok([])


def test_decode_round_trip(tok):
    for text in ["今天天气不错", "中文，标点。", "hello world", "广州和深圳哪个好？"]:
        assert tok.decode(tok(text).input_ids[0]) == text
    assert tok.decode(tok("HELLO World").input_ids[0]) == "hello world"
    ids = tok("今天", "很好").input_ids[0]
    assert tok.decode(ids) == "今天很好"
    assert tok.decode(ids, skip_special=False) == "[CLS]今天[SEP]很好[SEP]"


def test_vocab_file_round_trip_and_problems(tok, tmp_path):
    tok.save(tmp_path / "vocab.txt")
    again = CharTokenizer.from_file(tmp_path / "vocab.txt")
    assert again.vocab == tok.vocab
    (tmp_path / "bad.txt").write_text("a\nb\n[PAD]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"lacks the special tokens \['\[UNK\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        CharTokenizer.from_file(tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text("\n".join([*SPECIAL_TOKENS, "好", "好"]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="appears more than once"):
        CharTokenizer.from_file(tmp_path / "dup.txt")
    with pytest.raises(FileNotFoundError):
        CharTokenizer.from_file(tmp_path / "none.txt")


def test_build_vocab():
    vocab = build_vocab(["今天天气不错", "今天很好", "Hello hello world"], max_size=100)
    assert vocab[:5] == list(SPECIAL_TOKENS)
    assert len(vocab) == len(set(vocab)) <= 100
    assert "今" in vocab and "天" in vocab and "a" in vocab and "##a" in vocab
    assert vocab.index("天") < vocab.index("错")  # more frequent first
    assert "hello" in vocab  # a whole word seen twice (after lower-casing)
    assert build_vocab(["今天天气不错"], max_size=100) == build_vocab(["今天天气不错"], max_size=100)
    small = build_vocab(["今天天气不错"], max_size=80)
    assert len(small) == 80 and small[-3:] == ["天", "今", "气"]  # most frequent characters fill the room
    tok = CharTokenizer(build_vocab(["今天天气不错"]))
    assert tok.tokenize("xyz 123") == ["x", "##y", "##z", "1", "##2", "##3"]  # ASCII never [UNK]
    with pytest.raises(InputError, match="max_size must be at least 77"):
        build_vocab(["a"], max_size=60)


def test_tiny_tokenizer_helper_is_deterministic():
    assert tiny_tokenizer().vocab == tiny_tokenizer().vocab


def test_long_ascii_runs_split_like_bert4keras(tok):
    """bert4keras' word_maxlen is 200: a 150-letter run becomes word pieces, a 201-letter one [UNK]
    (HF's BertTokenizer gives [UNK] from 101 letters; rosim follows bert4keras, whose users it serves)."""
    pieces = tok.tokenize("a" * 150)
    assert pieces[0] == "a" and set(pieces[1:]) == {"##a"} and len(pieces) == 150
    assert tok.tokenize("a" * 200)[-1] == "##a"
    assert tok.tokenize("a" * 201) == ["[UNK]"]


def test_literal_mask_in_text_is_text_not_the_mask_token(tok):
    """As in bert4keras (it splits "[MASK]" into "[", "mask", "]"): text a user types can never
    inject special tokens; masking a position is done with ``mask_idxs``."""
    ids = tok.encode_ids("今天[MASK]")
    assert tok.mask_id not in ids
    assert len(tok.tokenize("[MASK]")) >= 3  # "[", the letters, "]" (each [UNK] if not in the vocabulary)
