"""Two gloo processes on half the rows each give the weights of one process on the whole batch.

What DDP promises is the averaged gradient of each step. The test therefore trains with plain SGD:
its update is the gradient times the learning rate, so last-bit differences in the summed gradients
(which differ between CPUs and kernels: AMD and Intel reduce in different orders) stay last-bit in
the weights. AdamW divides by sqrt(v), which turns a 1e-7 disagreement on a near-zero gradient into
a difference of the order of the learning rate (8.9e-5 on an AMD EPYC after three steps).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rosim.checkpoints.io import load_checkpoint
from rosim.training import trainer as trainer_module
from rosim.training.trainer import Trainer
from tests.training.test_trainer import paraphrases, tiny_cfg, write_pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sgd(model, lr, weight_decay, betas=None, eps=None):
    """Plain SGD in place of AdamW: the weights then carry the gradients linearly."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def _worker(rank: int, world: int, port: int, tmp: str, chunk: int) -> None:
    trainer_module.make_optimizer = _sgd  # spawned processes import afresh: patch here too
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = _cfg(tmp, "ddp", chunk)
    trainer = Trainer(cfg, "stage1", quiet=True)
    try:
        trainer.train()
    finally:
        trainer.close()


def _cfg(tmp, name, chunk):
    from pathlib import Path

    tmp = Path(tmp)
    cfg = tiny_cfg(tmp, str(tmp / "p.jsonl"), steps=3, batch_size=12, chunk_size=chunk, out_dir=str(tmp / name),
                   lr=0.5, warmup_steps=0, clip_norm=0.0)
    cfg.noise.row_prob = 0.5
    return cfg


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, monkeypatch):
    write_pairs(tmp_path / "p.jsonl", paraphrases())
    torch.set_num_threads(1)
    monkeypatch.setattr(trainer_module, "make_optimizer", _sgd)
    single_trainer = Trainer(_cfg(tmp_path, "single", 0), "stage1", quiet=True)
    start = {k: v.detach().clone() for k, v in single_trainer.model.state_dict().items()}
    single = single_trainer.train()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), 2), nprocs=2, join=True)
    a = load_checkpoint(single)[0].state_dict()
    b = load_checkpoint(tmp_path / "ddp" / "final")[0].state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-2, f"the weights barely moved ({moved}): the comparison would prove nothing"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    import json

    la = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    for ra, rb in zip(la, lb, strict=True):
        for key in ("loss", "gen", "sim"):
            assert abs(ra[key] - rb[key]) < 1e-4, (key, ra, rb)
