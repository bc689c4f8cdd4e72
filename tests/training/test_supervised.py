"""Supervised enhancement: readers, task-masked loss, mixing, training that raises Spearman, CLI, resume."""

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from rosim.checkpoints.io import load_checkpoint, save_checkpoint
from rosim.cli import main
from rosim.errors import DataError, InputError
from rosim.evaluation.metrics import spearman
from rosim.inference.sim_model import SimModel
from rosim.modeling.model import RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer, build_vocab
from rosim.training.config import supervised_config_from_dict
from rosim.training.labelled import LabelledPairs, PairMixer, read_nli_file, read_pair_file
from rosim.training.pair_classifier import load_pair_classifier, predict_proba
from rosim.training.pair_head import (
    PairHead,
    SupervisedObjective,
    encode_pairs_batch,
    pair_classification_loss,
)
from rosim.training.stages import StepContext
from rosim.training.supervised import SupervisedTrainer
from tests.helpers import tiny_config

torch.set_num_threads(1)

# toy task: synonyms share no characters, so a random encoder cannot tell them apart; the held-out
# split uses sentence frames never seen in training
GROUPS = [["高兴", "开心", "快乐"], ["难过", "伤心", "悲伤"], ["生气", "愤怒", "恼火"], ["害怕", "恐惧", "担忧"],
          ["便宜", "实惠", "划算"], ["漂亮", "好看", "美丽"]]
TRAIN_FRAMES = ["我今天很{}", "他觉得{}", "大家都{}了", "她有点{}"]
HELD_OUT_FRAMES = ["我们非常{}", "你是不是{}"]


def toy_pairs(frames, seed):
    rng = random.Random(seed)
    words = [(g, w) for g, ws in enumerate(GROUPS) for w in ws]
    out = []
    for (g1, w1), (g2, w2) in itertools.combinations(words, 2):
        f1, f2 = rng.sample(frames, 2)
        out.append((f1.format(w1), f2.format(w2), int(g1 == g2)))
    return out


def write_tsv(path, rows):
    path.write_text("".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


NLI = [{"sentence1": "我今天很高兴", "sentence2": "我今天很开心", "gold_label": "entailment"},
       {"sentence1": "他觉得难过", "sentence2": "他觉得快乐", "gold_label": "contradiction"},
       {"sentence1": "她有点害怕", "sentence2": "大家都生气了", "gold_label": "neutral"},
       {"sentence1": "我们非常高兴", "sentence2": "你是不是高兴", "gold_label": "-"}]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sup")
    train, held_out = toy_pairs(TRAIN_FRAMES, 0), toy_pairs(HELD_OUT_FRAMES, 1)
    texts = [s for a, b, _ in train + held_out for s in (a, b)]
    tok = CharTokenizer(build_vocab(texts, max_size=300))
    torch.manual_seed(0)
    save_checkpoint(root / "init", RoFormerSim(tiny_config(len(tok), hidden_dropout=0.1)), tok)
    return {"root": root, "train": write_tsv(root / "train.tsv", train), "held_out": held_out,
            "nli": write_jsonl(root / "nli.jsonl", NLI), "init": root / "init"}


def held_out_spearman(directory, held_out):
    m = SimModel.from_pretrained(directory)
    a, b = m.encode([x[0] for x in held_out]), m.encode([x[1] for x in held_out])
    return 100 * spearman((a * b).sum(1), [x[2] for x in held_out])


def config(toy, out_dir, **over):
    data = {"model": {"init": str(toy["init"])},
            "supervised": {"binary": [{"path": str(toy["train"])}], "maxlen": 16},
            "train": {"out_dir": str(out_dir), "steps": 150, "batch_size": 32, "lr": 3e-3, "save_every": 1000,
                      "log_every": 10}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return supervised_config_from_dict(data)


# ------------------------------------------------------------------------------------ training works
def test_supervised_training_raises_held_out_spearman(toy, tmp_path):
    before = held_out_spearman(toy["init"], toy["held_out"])
    final = SupervisedTrainer(config(toy, tmp_path / "run"), quiet=True).train()
    after = held_out_spearman(final, toy["held_out"])
    assert before < 10 and after > before + 20, (before, after)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 150 and log[-1]["loss"] < log[0]["loss"] and log[-1]["acc"] > 0.9
    # the head itself separates the classes of the training pairs
    model, tok, head = load_pair_classifier(final)
    a, b = ["我今天很高兴", "我今天很高兴"], ["他觉得开心", "他觉得难过"]
    proba = predict_proba(model, tok, head, a, b, task="binary", maxlen=16)
    assert proba.shape == (2, 2) and np.allclose(proba.sum(1), 1) and proba[0, 1] > proba[1, 1]


# ------------------------------------------------------------------------------------ the loss
def test_task_masked_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[0.5, -1.0, 3.0, 2.0, 9.0], [4.0, 5.0, 0.0, 1.0, -2.0]])
    labels, tasks = torch.tensor([1, 3]), torch.tensor([0, 1])  # a binary pair, an NLI pair (entailment)

    def ce(z, y):
        return -z[y] + math.log(sum(math.exp(x) for x in z))

    expected = (ce([0.5, -1.0], 1) + ce([0.0, 1.0, -2.0], 1)) / 2  # only the task's own classes compete
    got = pair_classification_loss(logits, labels, tasks)
    assert got["loss"].item() == pytest.approx(expected, rel=1e-6) and got["kl"].item() == 0
    # R-Drop with two identical passes is the plain loss; with different passes it adds (α/2)·SKL >= 0
    same = pair_classification_loss(logits, labels, tasks, logits, rdrop_alpha=4.0)
    assert same["loss"].item() == pytest.approx(expected, rel=1e-6)
    other = pair_classification_loss(logits, labels, tasks, logits.flip(0), rdrop_alpha=4.0)
    assert other["kl"].item() > 0 and math.isfinite(other["loss"].item())
    # features [u, v, |u - v|] and a bias-free 5-way head
    head = PairHead(4)
    u, v = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(PairHead.features(u, v), torch.cat([u, v, (u - v).abs()], -1))
    assert head.dense.bias is None and head(u, v).shape == (3, 5)


def test_rdrop_objective_without_dropout_equals_plain_training(toy):
    model, tok, _ = load_checkpoint(toy["init"])
    from rosim.training.trainer import set_dropout

    set_dropout(model, 0.0)
    model.train()
    batch = encode_pairs_batch(tok, [("我今天很高兴", "他觉得开心", 1, 0), ("他觉得难过", "大家都生气了", 0, 0),
                                     ("我今天很高兴", "我今天很开心", 3, 1)], 16)
    torch.manual_seed(0)
    head = PairHead(model.config.hidden_size)
    grads, losses = [], []
    for alpha in (0.0, 4.0):
        model.zero_grad()
        head.zero_grad()
        parts = SupervisedObjective(head, alpha).backward(model, batch, StepContext())
        grads.append([p.grad.clone() for p in [*model.parameters(), *head.parameters()] if p.grad is not None])
        assert parts["kl"] == pytest.approx(0.0, abs=1e-7)
        losses.append(parts["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


# ------------------------------------------------------------------------------------ data
def test_pair_reader_binary_threshold_and_errors(tmp_path):
    data = read_pair_file(write_tsv(tmp_path / "b.tsv", [("甲", "乙", 1), ("丙", "丁", 0)]))
    assert data.task == "binary" and data.labels.tolist() == [1, 0]
    scored = read_pair_file(write_tsv(tmp_path / "s.tsv", [("甲", "乙", 2.5), ("丙", "丁", 2.6), ("戊", "己", 5)]),
                            threshold=2.5)
    assert scored.labels.tolist() == [0, 1, 1]  # score > 2.5
    with pytest.raises(DataError, match=r"s\.tsv:1: label 2\.5 is not 0 or 1.*threshold"):
        read_pair_file(tmp_path / "s.tsv")
    write_tsv(tmp_path / "neg.tsv", [("甲", "乙", 1), ("丙", "丁", -1)])
    with pytest.raises(DataError, match=r"neg\.tsv:2: label -1 is not 0 or 1"):
        read_pair_file(tmp_path / "neg.tsv")
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="empty.tsv contains no sentence pairs"):
        read_pair_file(tmp_path / "empty.tsv")
    (tmp_path / "bad.tsv").write_text("甲\t乙\tyes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:1: label 'yes' is not a number"):
        read_pair_file(tmp_path / "bad.tsv")


def test_nli_reader_labels_dash_typos_and_empty(tmp_path):
    data = read_nli_file(write_jsonl(tmp_path / "n.jsonl", NLI))
    assert data.task == "nli" and data.labels.tolist() == [3, 2, 4] and data.skipped == 1
    with pytest.raises(DataError, match=r"n\.jsonl:4: gold_label '-'"):
        read_nli_file(tmp_path / "n.jsonl", skip_no_consensus=False)
    typo = [*NLI[:2], {"sentence1": "甲", "sentence2": "乙", "gold_label": "entailmnt"}]
    with pytest.raises(DataError, match=r"typo\.jsonl:3: gold_label 'entailmnt' is not one of .*did you mean 'entailment'"):
        read_nli_file(write_jsonl(tmp_path / "typo.jsonl", typo))
    with pytest.raises(DataError, match=r"key\.jsonl:1: missing key 'gold_label'"):
        read_nli_file(write_jsonl(tmp_path / "key.jsonl", [{"sentence1": "甲", "sentence2": "乙"}]))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty.jsonl contains no usable NLI pairs"):
        read_nli_file(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match=r"dash\.jsonl contains no usable NLI pairs \(1 records had gold_label '-'\)"):
        read_nli_file(write_jsonl(tmp_path / "dash.jsonl", NLI[3:]))
    with pytest.raises(InputError, match="binary pairs take classes"):
        LabelledPairs("binary", ["a"], ["b"], [3])


def test_mixer_alternates_tasks_one_to_one_and_resumes():
    binary = LabelledPairs("binary", [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)], [0, 1, 0, 1, 1])
    nli = LabelledPairs("nli", ["x", "y"], ["z", "w"], [2, 4])
    mixer = PairMixer(binary, nli, seed=3)
    first = mixer.next_pairs(6)
    assert [p[3] for p in first] == [0, 1, 0, 1, 0, 1]
    state = json.loads(json.dumps(mixer.state_dict()))
    rest = mixer.next_pairs(20)
    again = PairMixer(binary, nli, seed=3)
    again.load_state_dict(state)
    assert again.next_pairs(20) == rest
    seen = [p[0] for p in first + rest if p[3] == 0][:5]
    assert sorted(seen) == [f"a{i}" for i in range(5)]  # every pair once per epoch
    with pytest.raises(InputError, match="the data changed"):
        PairMixer(binary, None).load_state_dict(state)


# ------------------------------------------------------------------------------------ CLI, both phases
def test_cli_supervised_with_nli_rdrop_and_distillation(toy, tmp_path, capsys):
    write_jsonl(tmp_path / "weak.jsonl", [{"text_a": a, "text_b": b} for a, b, y in toy_pairs(TRAIN_FRAMES, 2) if y])
    cfg = tmp_path / "sup.toml"
    cfg.write_text(f"""
[model]
init = "{toy['init']}"
dropout = 0.1

[supervised]
binary = [{{path = "{toy['train']}"}}]
nli = [{{path = "{toy['nli']}"}}]
maxlen = 16
rdrop_alpha = 4.0

[train]
out_dir = "run"
steps = 3
batch_size = 8
lr = 1e-3
save_every = 2
log_every = 1

[distill.data]
sources = [{{path = "weak.jsonl"}}]
maxlen = 16

[distill.train]
steps = 2
batch_size = 8
lr = 1e-3
""", encoding="utf-8")
    code = main(["train", "supervised", "--config", str(cfg), "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "run"
    assert (run / "final" / "pair_head.safetensors").is_file()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["kl"] >= 0 for r in log)
    distilled = SimModel.from_pretrained(run / "distill" / "final")
    assert distilled.model.lm_head is not None
    out = distilled.generate("我今天很高兴", n=2, max_new_tokens=5, seed=0)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # running again without --resume/--overwrite is refused; --resume finishes at once
    assert main(["train", "supervised", "--config", str(cfg), "--quiet"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "supervised", "--config", str(cfg), "--quiet", "--resume", "--no-distill"]) == 0

    bad = tmp_path / "typo.jsonl"
    write_jsonl(bad, [{"sentence1": "甲", "sentence2": "乙", "gold_label": "neutrall"}])
    code = main(["train", "supervised", "--config", str(cfg), "--quiet", "--overwrite",
                 "--set", f'supervised.nli=[{{path = "{bad}"}}]'])
    err = capsys.readouterr().err
    assert code == 2 and "typo.jsonl:1: gold_label 'neutrall'" in err and "did you mean 'neutral'" in err
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("rdrop_alpha = 4.0", "rdrop_alpha = 4.0\ncolour = 1"),
                   encoding="utf-8")
    assert main(["train", "supervised", "--config", str(cfg), "--quiet"]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err


def test_resume_gives_the_same_weights(toy, tmp_path):
    def cfg(out, steps):
        return config(toy, out, train__steps=steps, train__batch_size=8, train__save_every=2,
                      supervised__rdrop_alpha=1.0, model__dropout=0.1)

    straight = SupervisedTrainer(cfg(tmp_path / "a", 4), quiet=True).train()
    SupervisedTrainer(cfg(tmp_path / "b", 2), quiet=True).train()
    resumed = SupervisedTrainer(cfg(tmp_path / "b", 4), resume=True, quiet=True).train()
    sa, sb = load_pair_classifier(straight), load_pair_classifier(resumed)
    for x, y in zip(sa[0].state_dict().values(), sb[0].state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(sa[2].dense.weight, sb[2].dense.weight)
