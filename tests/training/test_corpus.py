"""Corpus construction: sentence splitting, similarity, the two schemes, People's Daily, atomic output."""

import json

import pytest

from rosim.errors import DataError, InputError
from rosim.training import corpus as C


def test_split_sentences_keeps_punctuation_and_quotes():
    text = "他说：“今天天气不错。”我们去公园吧！好吗？？真的……\n第二段；没有句号"
    assert C.split_sentences(text) == ["他说：“今天天气不错。”", "我们去公园吧！", "好吗？？", "真的……", "第二段；", "没有句号"]


def test_similarity_variants():
    a, b = "我喜欢北京。", "我很喜欢北京！"
    fa, fb = C.char_features(a), C.char_features(b)
    assert fa == frozenset("我喜欢北京") and len(fb) == 6  # punctuation dropped
    assert C.set_similarity(fa, fb, "jaccard") == pytest.approx(5 / 6)
    assert C.set_similarity(fa, fb, "dice") == pytest.approx(10 / 11)
    assert C.set_similarity(fa, fb, "containment") == 1.0
    assert C.char_features("ＡＢ１２", 1) == frozenset("ab12")  # full-width folded
    assert C.char_features("北京大学", 2) == frozenset({"北京", "京大", "大学"})
    with pytest.raises(InputError, match="similarity"):
        C.set_similarity(fa, fb, "cosine")


def test_passage_scheme_threshold_and_near_copies():
    passage = ("今天北京的天气非常不错。今天北京天气很好，非常适合出门。"
               "股市昨日大幅下跌了三个百分点。今天北京的天气非常不错！")
    opts = C.PairOptions(min_chars=4)
    pairs = list(C.passage_pairs([passage], threshold=0.4, options=opts))
    texts = {(a, b) for a, b, _ in pairs}
    assert ("今天北京的天气非常不错。", "今天北京天气很好，非常适合出门。") in texts
    assert all("股市" not in a + b for a, b in texts)
    assert ("今天北京的天气非常不错。", "今天北京的天气非常不错！") not in texts  # 1.0 > max_similarity
    assert all(0.4 <= s <= 0.9 for _, _, s in pairs)
    with pytest.raises(InputError, match="threshold"):
        list(C.passage_pairs([passage], threshold=0.95))


def test_qa_scheme_pairs_only_across_answers():
    answers = ["多喝水可以缓解感冒症状。感冒时要注意休息。",
               "感冒时应当多喝水，可以缓解症状。天气冷要加衣服。"]
    pairs = list(C.qa_pairs([answers], threshold=0.3, options=C.PairOptions(min_chars=4)))
    assert pairs and all((a in answers[0]) != (b in answers[0]) for a, b, _ in pairs)
    top = pairs[0]
    assert {top[0], top[1]} == {"多喝水可以缓解感冒症状。", "感冒时应当多喝水，可以缓解症状。"}


def test_peoples_daily_with_and_without_document_ids(tmp_path):
    tagged = tmp_path / "pd.txt"
    tagged.write_text(
        "北京/ns  举行/v  新年/t  音乐会/n\n"
        "（/w  新华社/nt  记者/n  摄/Vg  ）/w\n"
        "[中国/ns  政府/n]nt  今天/t  表示/v  ，/w  欢迎/v  各国/r  朋友/n  。/w\n"
        "音乐会/n  在/p  北京/ns  举行/v  。/w  观众/n  很/d  多/a  。/w\n"
        "延安/ns  供水/vn  工程/n  建成/v\n"
        "延安/ns  工程/n  建成/v  通水/v  。/w  问题/n  解决/v  了/u  。/w\n", encoding="utf-8")
    passages = C.peoples_daily_passages(tagged)
    assert passages == ["中国政府今天表示，欢迎各国朋友。\n音乐会在北京举行。观众很多。",
                        "延安工程建成通水。问题解决了。"]
    with_ids = tmp_path / "pd_ids.txt"
    with_ids.write_text(
        "19980101-01-001-001/m  迈向/v  新/a  世纪/n  。/w\n"
        "19980101-01-001-002/m  我们/r  前进/v  。/w\n"
        "19980101-01-002-001/m  另/r  一/m  篇/q  。/w  第二/m  句/q  。/w\n", encoding="utf-8")
    assert C.peoples_daily_passages(with_ids) == ["迈向新世纪。\n我们前进。", "另一篇。第二句。"]


def test_write_pairs_atomic_shuffled(tmp_path):
    out = tmp_path / "sub" / "pairs.jsonl"
    pairs = [(f"句子甲{i}", f"句子乙{i}", 0.5) for i in range(20)]
    stats = C.write_pairs(pairs, out, seed=1)
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert stats == {"pairs": 20, "sentences": 40} and len(rows) == 20
    assert set(rows[0]) == {"text_a", "text_b"}
    assert [r["text_a"] for r in rows] != [p[0] for p in pairs]  # shuffled
    assert [p.name for p in out.parent.iterdir()] == ["pairs.jsonl"]
    with pytest.raises(DataError, match="no pairs"):
        C.write_pairs([], tmp_path / "empty.jsonl")
    assert not (tmp_path / "empty.jsonl").exists()


def test_cli_corpus_build(tmp_path):
    from rosim.cli import main

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "感冒怎么办？", "answers": [
        "多喝水可以缓解感冒症状。感冒时要注意休息。", "感冒时应当多喝水，可以缓解症状。天气冷要加衣服。"]},
        ensure_ascii=False) + "\n{bad\n", encoding="utf-8")
    assert main(["corpus", "build", "--qa", str(qa), "-o", str(tmp_path / "o.jsonl"), "-q"]) == 2  # malformed line
    qa.write_text(qa.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert main(["corpus", "build", "--qa", str(qa), "-o", str(tmp_path / "o.jsonl"), "-q",
                 "--qa-threshold", "0.3", "--min-chars", "4"]) == 0
    assert (tmp_path / "o.jsonl").read_text(encoding="utf-8").count("\n") >= 1
    assert main(["corpus", "build", "-o", str(tmp_path / "o.jsonl")]) == 2  # no input
