"""Reading pair files: good files, and errors that name the file and line."""

import pytest

from rosim.errors import DataError, InputError
from rosim.evaluation import parse_whiten, read_sts


def write(tmp_path, text, name="pairs.tsv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_reads_pairs_skipping_blank_lines(tmp_path):
    p = write(tmp_path, "\ufeff今天天气不错\t今天天气很好\t1\n\n我喜欢北京\t我不喜欢北京\t0.5\r\n")
    data = read_sts(p)
    assert data.texts_a == ["今天天气不错", "我喜欢北京"]
    assert data.texts_b == ["今天天气很好", "我不喜欢北京"]
    assert data.labels.tolist() == [1.0, 0.5]
    assert data.line_numbers == [1, 3]
    assert data.name == f"{tmp_path.name}/pairs.tsv"


@pytest.mark.parametrize("line, message", [
    ("只有一个字段\t1", "expected 3 tab-separated fields"),
    ("a b 1", "is the file tab-separated"),
    ("a\tb\tc\t1", "got 4"),
    ("a\tb\tyes", "label 'yes' is not a number"),
    ("a\tb\tnan", "not a finite number"),
    ("a\t \t1", "text_b is empty"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    p = write(tmp_path, f"好\t好\t1\n\n{line}\n")
    with pytest.raises(DataError, match=message) as info:
        read_sts(p)
    assert f"{p}:3:" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="contains no sentence pairs"):
        read_sts(write(tmp_path, "\n  \n"))
    with pytest.raises(InputError, match="not found"):
        read_sts(tmp_path / "nope.tsv")
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes(b"a\tb\t1\n" + "caf\xe9\tb\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.tsv:2: not UTF-8"):
        read_sts(bad)


def test_parse_whiten():
    assert [parse_whiten(x) for x in (None, "none", "FULL", "256", 8)] == ["none", "none", "full", "256", "8"]
    for bad in ("0", "-3", "half"):
        with pytest.raises(InputError, match="whiten"):
            parse_whiten(bad)
