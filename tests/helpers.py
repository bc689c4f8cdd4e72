"""Tiny models and vocabularies for tests."""

from __future__ import annotations

import pytest
import torch

from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer, build_vocab

SENTENCES = [
    "今天天气不错", "今天天气很好", "我喜欢北京", "我不喜欢北京", "广州和深圳哪个好？",
    "科学技术是第一生产力。", "电影不错", "给我推荐一款红色的车", "hello world 123", "苹果是红色的",
]


def tiny_tokenizer() -> CharTokenizer:
    return CharTokenizer(build_vocab(SENTENCES, max_size=200))


def tiny_config(vocab_size: int, **kw) -> RoFormerSimConfig:
    base = dict(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position=128, hidden_dropout=0.0)
    base.update(kw)
    return RoFormerSimConfig(**base)


def tiny_model(seed: int = 0, **kw) -> tuple[RoFormerSim, CharTokenizer]:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    return RoFormerSim(tiny_config(len(tok), **kw)).eval(), tok


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Import into a conftest for tests of tiny models and matrices: with one intra-op thread, a busy
    machine costs no OpenMP wake-up stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``rosim ARGV`` in-process: (exit code, stdout, stderr)."""
    from rosim.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
