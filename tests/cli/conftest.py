"""Shared by the CLI tests: two tiny checkpoints (``a``, ``b``) under one directory."""

import pytest

from rosim.checkpoints.io import save_checkpoint
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 0), ("b", 1)):
        model, tok = tiny_model(seed=seed)
        save_checkpoint(root / name, model, tok)
    return root
