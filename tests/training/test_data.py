"""Data: cutting, parsing errors with file:line, streaming, mixing ratios, resumable position, rows."""

import json
from collections import Counter

import pytest

from rosim.errors import DataError, InputError
from rosim.training.data import PairBatcher, PairStream, Source, cut_text, iter_texts, text_segmentate
from tests.helpers import tiny_tokenizer


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


def test_text_segmentate_like_bert4keras():
    text = "今天天气不错，我们去公园吧。明天会下雨吗？那就在家看书！"
    assert text_segmentate(text, 100) == [text]
    pieces = text_segmentate(text, 16)
    assert "".join(pieces) == text
    assert pieces == ["今天天气不错，我们去公园吧。", "明天会下雨吗？那就在家看书！"]
    assert text_segmentate("今天天气不错，我们去公园吧。", 8) == ["今天天气不错，", "我们去公园吧。"]
    assert text_segmentate("没有任何分隔符的一段很长很长的文字", 5) == ["没有任何分隔符的一段很长很长的文字"]
    # the spec's cut: maxlen * 1.2 characters, first piece kept
    assert cut_text(text, maxlen=12) == "今天天气不错，我们去公园吧。"  # 14 <= 14.4
    assert cut_text(text, maxlen=10) == "今天天气不错，"
    assert cut_text("   ", 10) == ""


def test_malformed_lines_name_file_and_line(tmp_path):
    p = write(tmp_path / "a.jsonl", [{"text_a": "你好", "text_b": "您好"}, "", "{not json", {"text_a": "早", "text_b": "早上好"}])
    stream = PairStream([Source(p)], maxlen=16)
    assert stream.next_pair() == ("你好", "您好")
    with pytest.raises(DataError, match=r"a\.jsonl:3: malformed JSON.*skip_bad_lines"):
        stream.next_pair()
    skipping = PairStream([Source(p)], maxlen=16, skip_bad_lines=True)
    got = [skipping.next_pair() for _ in range(4)]
    assert got == [("你好", "您好"), ("早", "早上好")] * 2 and skipping.skipped() == 2  # once per pass


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text_a": "", "text_b": "好"}, "'text_a' is empty"),
        ({"text_a": "好", "text_b": "  "}, "'text_b' is empty"),
        ({"text": "好", "synonyms": ["", "x"]}, r"synonyms\[0\] is empty"),
        ({"text": "好", "synonyms": "x"}, "must be a list"),
        ({"text_a": 3, "text_b": "好"}, "must be a string"),
        ({"question": "好"}, "needs either"),
        ([1, 2], "expected a JSON object"),
        ({"text": "只有一句"}, "at least two texts"),
    ],
)
def test_bad_records(tmp_path, record, message):
    p = write(tmp_path / "b.jsonl", [record])
    with pytest.raises(DataError, match=message):
        PairStream([Source(p)]).next_pair()
    if record != {"text": "只有一句"}:  # lone texts are fine for vocabularies and the MLM stage
        with pytest.raises(DataError, match=message):
            list(iter_texts(p))


def test_group_of_one_and_empty_sources(tmp_path):
    p = write(tmp_path / "g.jsonl", [{"text": "只有一句"}])
    with pytest.raises(DataError, match="no usable records"):
        PairStream([Source(p)], skip_bad_lines=True).next_pair()
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable records"):
        PairStream([Source(str(empty))]).next_pair()
    with pytest.raises(FileNotFoundError):
        Source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="ratio"):
        Source(p, ratio=0)


def test_groups_draw_two_distinct_members(tmp_path):
    p = write(tmp_path / "g.jsonl", [{"text": "甲", "synonyms": ["乙", "丙"]}])
    stream = PairStream([Source(p)], seed=1)
    seen = Counter(stream.next_pair() for _ in range(300))
    assert all(a != b for a, b in seen) and len(seen) == 6


def test_mixing_ratios_are_exact(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"text_a": f"甲{i}", "text_b": "乙"} for i in range(7)])
    b = write(tmp_path / "b.jsonl", [{"text_a": f"丙{i}", "text_b": "丁"} for i in range(5)])
    stream = PairStream([Source(a, 3), Source(b, 1)])
    first = [stream.next_pair()[0][0] for _ in range(400)]
    assert Counter(first) == {"甲": 300, "丙": 100}
    assert all(Counter(first[i:i + 4])["甲"] == 3 for i in range(0, 400, 4))  # smooth, not bursty


def test_resume_position_reproduces_the_stream(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"text_a": f"甲{i}", "text_b": f"乙{i}"} for i in range(13)])
    b = write(tmp_path / "b.jsonl", [{"text": f"丙{i}", "synonyms": [f"丁{i}", f"戊{i}"]} for i in range(5)])

    def make():
        return PairStream([Source(a, 1), Source(b, 2)], seed=5, shuffle_buffer=4)

    s1 = make()
    for _ in range(23):
        s1.next_pair()
    state = json.loads(json.dumps(s1.state_dict()))  # JSON round trip, as in a checkpoint
    rest = [s1.next_pair() for _ in range(40)]
    s2 = make()
    s2.load_state_dict(state)
    assert [s2.next_pair() for _ in range(40)] == rest
    other = PairStream([Source(a, 1)], seed=5)
    with pytest.raises(InputError, match="saved for sources"):
        other.load_state_dict(state)


def test_rows_are_both_directions_and_truncated(tmp_path):
    tok = tiny_tokenizer()
    batcher = PairBatcher(tok, maxlen=6, noise_row_prob=0.0)
    a, b = "今天天气不错", "我喜欢北京，今天天气很好"
    batch = batcher([(a, b), ("电影不错", "苹果")], step=0)
    enc = batch.encoding
    assert batch.rows == 4 and batch.sources == [a, b, "电影不错", "苹果"]
    assert enc.attention_mask.sum(1).max() <= 12  # maxlen * 2
    row0 = enc.input_ids[0][enc.attention_mask[0] == 1].tolist()
    row1 = enc.input_ids[1][enc.attention_mask[1] == 1].tolist()
    assert row0[0] == tok.cls_id and row0[-1] == tok.sep_id
    # longest-first truncation of the pair to 12 tokens: 9 text tokens in all
    ids_a, ids_b = tok.encode_ids(a), tok.encode_ids(b)
    assert row0 == [tok.cls_id, *ids_a[:4], tok.sep_id, *ids_b[:5], tok.sep_id]
    assert row1 == [tok.cls_id, *ids_b[:4], tok.sep_id, *ids_a[:5], tok.sep_id]  # ties pop the first
    types = enc.token_type_ids[2][enc.attention_mask[2] == 1].tolist()
    assert types == [0] * 6 + [1] * 3
    shard = batch.shard(1, 2)
    assert shard.rows == 2 and shard.sources == ["电影不错", "苹果"]
    assert shard.encoding.input_ids.shape[1] == 9  # re-padded to its own longest row


def test_next_texts_for_mlm_resumes(tmp_path):
    p = write(tmp_path / "m.jsonl", [{"text": "一句话而已"}, {"text_a": "甲乙", "text_b": "丙丁"},
                                     {"text": "组一", "synonyms": ["组二"]}])
    stream = PairStream([Source(p)], single_texts=True)
    assert stream.next_texts(3) == ["一句话而已", "甲乙", "丙丁"]
    state = json.loads(json.dumps(stream.state_dict()))
    rest = stream.next_texts(4)
    assert rest == ["组一", "组二", "一句话而已", "甲乙"]
    again = PairStream([Source(p)], single_texts=True)
    again.load_state_dict(state)
    assert again.next_texts(4) == rest
    lone = write(tmp_path / "l.jsonl", [{"text": "一句话而已"}])
    with pytest.raises(DataError, match="lone text"):
        PairStream([Source(lone)], single_texts=True).next_pair()
