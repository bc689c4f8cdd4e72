"""`rosim similar` (texts and --file with resume), `rosim sim`: outputs, bounds and exit codes."""

import json

import pytest

from tests.helpers import SENTENCES, run_cli

FAST = ["-n", "6", "-k", "3", "--max-new-tokens", "6"]


@pytest.fixture
def questions(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return p


run = run_cli


def test_similar_texts_json(capsys, ckpt):
    code, out, _ = run(capsys, "similar", SENTENCES[0], SENTENCES[1], "--json", "--seed", "1", *FAST,
                       "--model", ckpt / "a")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(0 < len(r) <= 3 for r in rows)


def test_similar_file_resumes_exactly(capsys, ckpt, questions, tmp_path):
    args = ["similar", "--file", questions, *FAST, "--seed", "7", "--batch", "3", "-q", "--model", ckpt / "a"]
    whole = tmp_path / "whole.jsonl"
    assert run(capsys, *args, "-o", whole)[0] == 0
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [json.loads(x)["text"] for x in lines] == SENTENCES
    assert json.loads((tmp_path / "whole.jsonl.rosim.json").read_text())["n"] == 6

    cut = tmp_path / "cut.jsonl"  # killed in the middle of unit 2 (lines 3-5), mid-line
    cut.write_text("".join(lines[:4]) + lines[4][:9], encoding="utf-8")
    (tmp_path / "cut.jsonl.rosim.json").write_bytes((tmp_path / "whole.jsonl.rosim.json").read_bytes())
    code, _, _ = run(capsys, *args, "-o", cut)
    assert code == 0
    assert cut.read_text(encoding="utf-8") == "".join(lines[:4]) + "".join(lines[4:])  # same lines, same order
    code, _, err = run(capsys, *args[:-1], ckpt / "a", "-o", cut)[0:3]
    assert code == 0 and cut.read_text(encoding="utf-8") == "".join(lines)  # nothing left to do


@pytest.mark.parametrize("change, fragment", [
    (["-n", "8"], "n 6 -> 8"),
    (["-k", "2"], "k 3 -> 2"),
    (["--seed", "8"], "seed 7 -> 8"),
    (["--model", "b"], "model"),
])
def test_similar_file_refuses_to_resume_with_other_settings(capsys, ckpt, questions, tmp_path, change, fragment):
    out = tmp_path / "o.jsonl"
    base = ["similar", "--file", questions, *FAST, "--seed", "7", "-q", "-o", out]
    assert run(capsys, *base, "--model", ckpt / "a")[0] == 0
    before = out.read_bytes()
    if change[0] == "--model":
        change = ["--model", ckpt / "b"]
    code, _, err = run(capsys, *base, "--model", ckpt / "a", *change)
    assert code == 2 and fragment in err and "pick another -o" in err
    assert out.read_bytes() == before


def test_similar_file_refuses_a_file_it_did_not_write(capsys, ckpt, questions, tmp_path):
    out = tmp_path / "user.jsonl"
    mine = '{"text": "今天天气不错", "synonyms": ["今天天气很好"]}'  # a user's file, no final newline
    out.write_text(mine, encoding="utf-8")
    code, _, err = run(capsys, "similar", "--file", questions, *FAST, "-o", out, "--model", ckpt / "a")
    assert code == 2 and "was not written by `rosim similar --file`" in err
    assert out.read_text(encoding="utf-8") == mine
    questions.write_text("今天天气不错\n", encoding="utf-8")  # the input changed since the output was made
    other = tmp_path / "o.jsonl"
    assert run(capsys, "similar", "--file", questions, *FAST, "-q", "-o", other, "--model", ckpt / "a")[0] == 0
    questions.write_text("今天天气很好\n", encoding="utf-8")
    code, _, err = run(capsys, "similar", "--file", questions, *FAST, "-q", "-o", other, "--model", ckpt / "a")
    assert code == 2 and "the input file changed" in err


@pytest.mark.parametrize("target", ["/dev/null", "/dev/full"])
def test_similar_file_refuses_devices(capsys, ckpt, questions, target):
    code, _, err = run(capsys, "similar", "--file", questions, *FAST, "-o", target, "--model", ckpt / "a")
    assert code == 2 and "refusing" in err


def test_similar_file_to_a_pipe_is_refused_not_hung(ckpt, questions):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from rosim.cli import main; sys.exit(main())", "similar", "--file",
           str(questions), *FAST, "-o", "/dev/stdout", "--model", str(ckpt / "a")]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, text=True)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("argv, fragment", [
    (["-n", "0"], "n must be in 1..1000"),
    (["-n", "1000000000"], "n must be in 1..1000"),
    (["-n", "99999999999999999999999"], "n must be in 1..1000"),
    (["-n", "4", "-k", "5"], "k (5) cannot exceed n (4)"),
    (["-n", "4", "-k", "-1"], "k must be in"),
    (["--seed", "99999999999999999999999"], "seed must be in 0.."),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens must be in 1..512"),
])
def test_similar_bounds_exit_2(capsys, ckpt, argv, fragment):
    code, _, err = run(capsys, "similar", "今天天气不错", *argv, "--model", ckpt / "a")
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_similar_empty_text_in_a_list_exit_2(capsys, ckpt):
    code, _, err = run(capsys, "similar", "今天天气不错", " ", *FAST, "--model", ckpt / "a")
    assert code == 2 and "text 1 is empty" in err


def test_sim_prints_one_cosine(capsys, ckpt):
    code, out, _ = run(capsys, "sim", SENTENCES[0], SENTENCES[0], "--model", ckpt / "a")
    assert code == 0 and out.strip() == "1.0000"
