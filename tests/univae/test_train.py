"""UniVAE training: the loss goes down, checkpoints are safe, and resuming is exact."""

from __future__ import annotations

import json

import pytest
import torch

from rosim.errors import InputError
from rosim.univae import UniVAE
from rosim.univae.data import load_sentences, split_sentences
from rosim.univae.evaluate import edit_distance, latent_usage, reconstruction_scores
from rosim.univae.train import VAETrainConfig, VAETrainer, epoch_batches
from tests.univae.helpers import SENTENCES, tiny_vae

TOY = [s for s in SENTENCES if "hello" not in s]


def _cfg(**kw):
    base = dict(steps=30, batch_size=3, lr=3e-3, warmup_steps=0, schedule="constant", save_every=10, log_every=5)
    base.update(kw)
    return VAETrainConfig(**base)


def test_training_lowers_the_loss(tmp_path):
    vae = tiny_vae(seed=0)
    batch = vae.build_inputs(TOY)
    before = float(vae.loss(batch, noise=False)[0].detach())
    VAETrainer(TOY, tmp_path / "run", _cfg(), model=vae, quiet=True).train()
    after = float(vae.eval().loss(batch, noise=False)[0].detach())
    assert after < 0.6 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["loss"] < log[0]["loss"]
    assert UniVAE.from_pretrained(tmp_path / "run" / "final").config.to_dict() == vae.config.to_dict()
    usage = latent_usage(vae, TOY)
    assert usage["ce_own_latents"] == pytest.approx(float(after), rel=1e-4) and usage["latent_gain_nats"] > -1e-3


def test_resume_is_exact(tmp_path):
    cfg = _cfg(steps=6, save_every=3, lr=1e-3)
    straight = tiny_vae(seed=1, hidden_dropout=0.1)  # dropout on: the random state must be restored too
    VAETrainer(TOY, tmp_path / "a", cfg, model=straight, quiet=True).train()

    VAETrainer(TOY, tmp_path / "b", _cfg(steps=3, save_every=3, lr=1e-3), model=tiny_vae(seed=1, hidden_dropout=0.1),
               quiet=True).train()
    resumed = VAETrainer(TOY, tmp_path / "b", cfg, resume=True, quiet=True)
    assert resumed.step == 3
    resumed.train()
    a = UniVAE.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = UniVAE.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_refuses_to_clobber_or_mix_runs(tmp_path):
    VAETrainer(TOY, tmp_path / "r", _cfg(steps=2, save_every=2), model=tiny_vae(), quiet=True).train()
    with pytest.raises(InputError, match="already holds checkpoints"):
        VAETrainer(TOY, tmp_path / "r", _cfg(steps=2), model=tiny_vae(), quiet=True)
    with pytest.raises(InputError, match="different sentences"):
        VAETrainer(TOY[:-1], tmp_path / "r", _cfg(steps=4), resume=True, quiet=True)
    with pytest.raises(InputError, match="fewer than one batch"):
        VAETrainer(TOY[:2], tmp_path / "s", _cfg(), model=tiny_vae(), quiet=True)
    with pytest.raises(InputError, match="steps must be a positive integer"):
        VAETrainer(TOY, tmp_path / "s", _cfg(steps=0), model=tiny_vae(), quiet=True)


def test_epoch_batches_cover_each_sentence_once():
    lengths = [len(s) for s in TOY * 5]
    batches = epoch_batches(0, lengths, 4, seed=0, pool=2)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == len(lengths) - len(lengths) % 4
    assert epoch_batches(0, lengths, 4, seed=0, pool=2) == batches != epoch_batches(1, lengths, 4, seed=0, pool=2)


def test_metrics_and_sentences(tmp_path):
    assert edit_distance("今天天气不错", "今天天气很好") == 2 and edit_distance("", "abc") == 3
    scores = reconstruction_scores(["今天天气不错", "我喜欢"], ["今天天气不错", "我喜欢北京"])
    assert scores["exact_match"] == 0.5 and scores["char_accuracy"] == pytest.approx(1 - 2 / 11)
    assert split_sentences("很好。不过太贵了！真的吗？？还行") == ["很好。", "不过太贵了！", "真的吗？？", "还行"]
    (tmp_path / "s.txt").write_text("今天天气不错。我喜欢北京！\nhello world\n短\n", encoding="utf-8")
    assert load_sentences([], [tmp_path / "s.txt"], min_chars=2) == ["今天天气不错。", "我喜欢北京！"]
    with pytest.raises(InputError, match="unknown corpus"):
        load_sentences(["wiki"])
