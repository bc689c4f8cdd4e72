"""Losses, config, objectives and the trainer on tiny models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rosim.checkpoints.io import load_checkpoint
from rosim.errors import DataError, InputError
from rosim.training.config import config_from_dict, load_config
from rosim.training.losses import distillation_loss, generation_loss
from rosim.training.teachers import VectorFileTeacher, precompute_teacher_vectors
from rosim.training.trainer import Trainer, lr_factor, make_optimizer
from tests.helpers import tiny_model

torch.set_num_threads(1)

SUBJECTS = ["我", "你", "他", "她", "老师", "学生", "妈妈", "爸爸", "朋友", "同学"]
PLACES = ["北京", "上海", "广州", "深圳", "杭州", "南京", "西安", "成都"]


def paraphrases():
    pairs = []
    for i, s in enumerate(SUBJECTS):
        p, q = PLACES[i % len(PLACES)], PLACES[(i * 3 + 1) % len(PLACES)]
        pairs.append((f"{s}明天去{p}", f"明天{s}要去{p}"))
        pairs.append((f"{s}喜欢{q}吗？", f"{q}是{s}喜欢的地方吗？"))
    return pairs


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"text_a": a, "text_b": b}, ensure_ascii=False) + "\n" for a, b in pairs),
                    encoding="utf-8")
    return str(path)


def tiny_cfg(tmp_path, data, **train):
    t = {"out_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 8, "lr": 1e-3, "save_every": 1000,
         "log_every": 1, "seed": 0}
    t.update(train)
    return config_from_dict({
        "model": {"vocab": "build", "vocab_size": 200,
                  "config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                             "max_position": 64, "hidden_dropout": 0.0}},
        "data": {"sources": [{"path": data}], "maxlen": 24, "shuffle_buffer": 8},
        "train": t,
    })


# ------------------------------------------------------------------------------------ losses
def test_generation_loss_masks_source_and_padding():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 10, 11, 3, 12, 13, 3], [2, 14, 3, 15, 3, 0, 0]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]])
    att = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    logits = torch.randn(2, 7, 20)
    # targets: row 0 predicts 12, 13, [SEP] from positions 3, 4, 5; row 1 predicts 15, [SEP] from 2, 3
    picked = torch.stack([logits[0, 3], logits[0, 4], logits[0, 5], logits[1, 2], logits[1, 3]])
    expected = F.cross_entropy(picked, torch.tensor([12, 13, 3, 15, 3]))
    assert torch.allclose(generation_loss(logits, ids, types, att), expected)
    assert torch.allclose(generation_loss(logits, ids, types, att, reduction="sum"), expected * 5)
    with pytest.raises(InputError, match="no target tokens"):
        generation_loss(logits, ids, torch.zeros_like(types), att)


def test_distillation_loss_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 8), torch.randn(6, 5)
    zs, zt = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    expected = 100 * ((zs @ zs.T - zt @ zt.T) ** 2).sum() / 36
    assert torch.allclose(distillation_loss(s, t), expected)
    assert distillation_loss(t * 3, t).item() < 1e-10
    with pytest.raises(InputError, match="rows"):
        distillation_loss(s, t[:4])


# ------------------------------------------------------------------------------------ config
def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 3\nlearning_rate = 0.1\nbatchsize = 4\n[data]\nsources = [{path = "x"}]\n')
    with pytest.raises(InputError, match=r"\[train\]: unknown keys \['batchsize', 'learning_rate'\]"):
        load_config(p)
    p.write_text('[trian]\nsteps = 3\n')
    with pytest.raises(InputError, match=r"unknown keys \['trian'\]"):
        load_config(p)
    p.write_text('[data]\nsources = [{path = "x", weight = 2}]\n')
    with pytest.raises(InputError, match=r"sources\[0\]: unknown keys \['weight'\]"):
        load_config(p)
    p.write_text("[data\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(p)
    p.write_text('[data]\nsources = [{path = "d.jsonl"}]\n[train]\nbatch_size = 7\n[model]\nvocab = "build"\n')
    cfg = load_config(p)
    assert cfg.data.sources[0].path == str(tmp_path / "d.jsonl")  # relative to the config file
    with pytest.raises(InputError, match="even"):
        cfg.validate("stage1")
    with pytest.raises(InputError, match="teacher"):
        load_config(p, {"train.batch_size": 8}).validate("stage2")


def test_optimizer_groups_and_schedule():
    model, _ = tiny_model()
    opt = make_optimizer(model, 1e-3, 0.01)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.lm_head.bias for p in no_decay["params"])
    assert [lr_factor(s, 10, 4, "constant") for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(4, 10, 4, "linear") == 1.0 and lr_factor(10, 10, 4, "linear") == 0.0
    assert abs(lr_factor(7, 10, 4, "cosine") - 0.5) < 1e-9


# ------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_stage1_learns_paraphrases_and_retrieval(tmp_path):
    """250 steps on 20 fixed pairs: greedy decoding reproduces the partner, vectors find it."""
    pairs = paraphrases()
    data = write_pairs(tmp_path / "p.jsonl", pairs)
    cfg = tiny_cfg(tmp_path, data, steps=250, batch_size=16, lr=3e-3, warmup_steps=10, log_every=25)
    cfg.model.config.update(hidden_size=64, intermediate_size=128)
    cfg.noise.row_prob = 0.0
    cfg.data.shuffle_buffer = 40
    final = Trainer(cfg, "stage1", quiet=True).train()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["gen"] < 0.3 * log[0]["gen"] and log[-1]["sim"] < 0.5 * log[0]["sim"]
    assert all(k in log[0] for k in ("loss", "gen", "sim", "lr", "tokens_per_s", "grad_norm"))

    model, tok, _ = load_checkpoint(final)

    def greedy(text):
        ids, types = tok.build_inputs(tok.encode_ids(text))
        out = []
        for _ in range(24):
            x, tt = torch.tensor([ids + out]), torch.tensor([types + [1] * len(out)])
            with torch.no_grad():
                nxt = int(model.lm_logits(model(x, tt, mask="unilm").last_hidden_state[:, -1]).argmax())
            if nxt == tok.sep_id:
                break
            out.append(nxt)
        return tok.decode(out)

    rows = [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]
    exact = sum(greedy(src) == tgt for src, tgt in rows)
    assert exact >= 0.9 * len(rows), f"only {exact}/{len(rows)} paraphrases reproduced"
    texts = [t for pair in pairs for t in pair]
    enc = tok(texts, max_length=24)
    with torch.no_grad():
        z = F.normalize(model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled, dim=-1)
    sims = (z @ z.T).fill_diagonal_(-2)
    partner = torch.arange(len(texts)) ^ 1
    assert (sims.argmax(1) == partner).float().mean() >= 0.8


def test_chunked_contrastive_equals_full_batch(tmp_path):
    """The gradient-cached step (chunks of 3 rows, dropout on) gives the full-batch gradients."""
    from rosim.training.stages import StepContext

    data = write_pairs(tmp_path / "p.jsonl", paraphrases())
    cfg = tiny_cfg(tmp_path, data, batch_size=12)
    cfg.model.dropout = 0.1
    for stage in ("stage1", "stage2"):
        teacher = HashTeacher() if stage == "stage2" else None
        trainer = Trainer(cfg, stage, quiet=True, overwrite=True, teacher=teacher)
        batch = trainer._next_global_batch()
        grads, parts = [], []
        for chunk in (0, 5):
            trainer.model.zero_grad()
            torch.manual_seed(1)
            if chunk == 0:  # reference: chunks forwarded in order, so dropout masks match the cache's
                parts.append(_reference_step(trainer, batch, stage))
            else:
                parts.append(trainer.objective.backward(trainer.model, batch, StepContext(chunk_size=chunk)))
            grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters()})
        assert abs(parts[0]["loss"] - parts[1]["loss"]) < 1e-5
        for k in grads[0]:
            assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4), (stage, k)


def _reference_step(trainer, batch, stage):
    """Plain autograd over the whole batch, forwarding the same 5-row chunks in order."""
    from rosim.training.losses import generation_target_mask, roformer_sim_contrastive_loss
    from rosim.training.stages import gen_loss_sum

    model, enc = trainer.model, batch.encoding
    n_targets = int(generation_target_mask(enc.token_type_ids, enc.attention_mask).sum())
    pooled, gen = [], 0.0
    for s in range(0, batch.rows, 5):
        ids, tt, am = (x[s:s + 5] for x in (enc.input_ids, enc.token_type_ids, enc.attention_mask))
        out = model(ids, tt, am, mask="unilm")
        pooled.append(out.pooled)
        gen = gen + gen_loss_sum(model, out.last_hidden_state, ids, tt, am) / n_targets
    z = torch.cat(pooled)
    if stage == "stage1":
        coupled = roformer_sim_contrastive_loss(z, 20.0)
    else:
        teacher = torch.from_numpy(trainer.objective.teacher.encode(batch.sources)).float()
        coupled = distillation_loss(z, teacher, 100.0)
    (gen + coupled).backward()
    return {"loss": float((gen + coupled).detach())}


class HashTeacher:
    """A deterministic stand-in teacher: a fixed random vector per text."""

    def __init__(self, dim=12):
        self.dim = dim

    def encode(self, texts):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts])


def test_stage2_with_vector_file_and_bad_teachers(tmp_path):
    from rosim.training.data import cut_text, iter_texts

    pairs = paraphrases()
    data = write_pairs(tmp_path / "p.jsonl", pairs)
    vec = tmp_path / "teacher.npz"
    n = precompute_teacher_vectors(HashTeacher(), (cut_text(t, 24) for t in iter_texts(data)), vec)
    assert n == 40 and VectorFileTeacher(vec).encode(["我明天去北京"]).shape == (1, 12)
    cfg = config_from_dict({**json.loads(json.dumps({
        "model": {"vocab": "build", "vocab_size": 200, "config": {"hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                                                   "intermediate_size": 64, "hidden_dropout": 0.0}},
        "data": {"sources": [{"path": data}], "maxlen": 24},
        "train": {"out_dir": str(tmp_path / "s2"), "steps": 3, "batch_size": 8, "log_every": 1},
        "teacher": {"kind": "file", "path": str(vec)},
    }))})
    Trainer(cfg, "stage2", quiet=True).train()
    log = [json.loads(x) for x in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["distill"] > 0 and r["gen"] > 0 for r in log)

    # a text the file does not cover
    np.savez(tmp_path / "partial.npz", texts=np.array(["我明天去北京"]), vectors=np.ones((1, 12), np.float32))
    cfg.teacher.path = str(tmp_path / "partial.npz")
    with pytest.raises(DataError, match="no vector for the text"):
        Trainer(cfg, "stage2", quiet=True, overwrite=True).train()
    # rows and texts disagree
    np.savez(tmp_path / "bad.npz", texts=np.array(["a", "b"]), vectors=np.ones((3, 12), np.float32))
    with pytest.raises(DataError, match="2 texts but vectors of shape"):
        VectorFileTeacher(tmp_path / "bad.npz")

    class Shifty(HashTeacher):  # changes dimension between calls
        calls = 0

        def encode(self, texts):
            self.calls += 1
            self.dim = 12 if self.calls == 1 else 13
            return super().encode(texts)

    with pytest.raises(DataError, match="dimension 13, earlier ones 12"):
        Trainer(cfg, "stage2", quiet=True, overwrite=True, teacher=Shifty()).train()


def test_mlm_stage_and_existing_output(tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", paraphrases())
    cfg = tiny_cfg(tmp_path, data, steps=2)
    Trainer(cfg, "mlm", quiet=True).train()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["mlm"] > 0
    with pytest.raises(InputError, match="--resume"):
        Trainer(cfg, "mlm", quiet=True)
    with pytest.raises(Exception, match="mlm checkpoint; cannot resume stage1"):
        Trainer(cfg, "stage1", quiet=True, resume=True)


def test_lambdalr_schedule_gives_the_lr_factor_values():
    """The loop's LambdaLR sets exactly base_lr * lr_factor(step) for every step and schedule."""
    from rosim.training.loop import lr_schedule

    for schedule in ("constant", "linear", "cosine"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        sched = lr_schedule(opt, 12, 4, schedule)
        seen = []
        for _ in range(12):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert seen == [0.3 * lr_factor(s, 12, 4, schedule) for s in range(12)], schedule
        state = json.loads(json.dumps(sched.state_dict()))  # checkpointed as JSON
        again = lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3), 12, 4, schedule)
        again.load_state_dict(state)
        assert again.last_epoch == 12 and again.get_last_lr() == sched.get_last_lr()
