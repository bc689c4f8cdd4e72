"""`rosim vae ...`: a tiny end-to-end run and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from rosim.cli import main

TEXTS = ["今天天气不错", "我喜欢北京", "广州和深圳哪个好？", "电影不错", "苹果是红色的", "我不喜欢北京"]
TINY = ["--scratch", "--steps", "4", "--batch-size", "2", "--layers", "2", "--hidden", "32", "--heads", "4",
        "--num-latent-layers", "1", "--z-dim", "4", "--maxlen", "16", "--quiet", "--save-every", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    (root / "data.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert main(["vae", "train", "-o", str(root / "run"), "--data", str(root / "data.txt"), "--holdout", "1", *TINY]) == 0
    return root


def test_train_writes_a_run(trained):
    run = trained / "run"
    assert (run / "final" / "univae.json").is_file() and (run / "holdout.txt").read_text(encoding="utf-8").count("\n") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_sample_reconstruct_resample(trained, capsys):
    model = str(trained / "run" / "final")
    capsys.readouterr()
    assert main(["vae", "sample", model, "-n", "3", "--seed", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["vae", "reconstruct", model, "今天天气不错", "电影不错", "--json", "--metrics"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["text"] for r in rows] == ["今天天气不错", "电影不错"]
    assert set(json.loads(captured.err.strip().splitlines()[-1])) >= {"char_accuracy", "exact_match", "latent_gain_nats"}
    assert main(["vae", "resample", model, "今天天气不错", "--layers", "-1", "-n", "2", "--seed", "1", "--sample",
                 "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "# 今天天气不错"


@pytest.mark.parametrize(("args", "message"), [
    (["resample", "{model}", "今天", "--layers", "3"], "latent layer 3 is out of range"),
    (["resample", "{model}", "今天", "--layers", "a,b"], "--layers expects comma-separated"),
    (["sample", "{model}", "-n", "0"], "n must be a positive integer"),
    (["sample", "{model}", "--top-p", "0.9"], "add --sample"),
    (["reconstruct", "{model}"], "give at least one TEXT"),
    (["reconstruct", "{root}/missing", "今天"], "checkpoint directory not found"),
    (["reconstruct", "{root}", "今天"], "not a rosim checkpoint"),
    (["train", "-o", "{root}/run", "--data", "{root}/data.txt", *TINY], "already holds checkpoints"),
    (["train", "-o", "{root}/new", "--data", "{root}/data.txt", "--kappa", "0", *TINY], "kappa must be a finite number > 0"),
    (["train", "-o", "{root}/new"], "no training sentences"),
])
def test_bad_input_exits_2(trained, capsys, args, message):
    args = [a.format(model=trained / "run" / "final", root=trained) for a in args]
    capsys.readouterr()
    assert main(["vae", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
