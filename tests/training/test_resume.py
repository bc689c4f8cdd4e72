"""SIGKILL mid-run, then --resume: the final weights equal an uninterrupted run's, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.test_trainer import paraphrases, write_pairs

CONFIG = """
[model]
vocab = "build"
vocab_size = 200
dropout = 0.1
[model.config]
hidden_size = 32
num_layers = 2
num_heads = 4
intermediate_size = 64
max_position = 64
[data]
sources = [{{path = "p.jsonl", ratio = 2}}, {{path = "g.jsonl", ratio = 1}}]
maxlen = 24
shuffle_buffer = 6
[train]
out_dir = "{out}"
steps = 30
batch_size = 8
lr = 2e-3
warmup_steps = 5
schedule = "linear"
save_every = 5
keep_last = 2
log_every = 5
seed = 11
"""


def rosim(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = "import sys; from rosim.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _write_data(tmp_path: Path) -> None:
    """p.jsonl (pairs) and g.jsonl (synonym groups), the two sources of CONFIG."""
    write_pairs(tmp_path / "p.jsonl", paraphrases())
    (tmp_path / "g.jsonl").write_text(
        "".join(json.dumps({"text": f"{p}怎么样？", "synonyms": [f"{p}好不好？", f"你觉得{p}如何？"]},
                           ensure_ascii=False) + "\n" for p in ("北京", "上海", "广州")), encoding="utf-8")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path):
    _write_data(tmp_path)
    for name in ("full", "killed"):
        (tmp_path / f"{name}.toml").write_text(CONFIG.format(out=name))

    full = rosim("train", "stage1", "-c", "full.toml", "-q", cwd=tmp_path)
    killed = rosim("train", "stage1", "-c", "killed.toml", "-q", cwd=tmp_path)
    target = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.time() + 120
    while not target.exists():
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it was killed"
    assert full.wait(timeout=180) == 0, full.stderr.read().decode()

    resumed = rosim("train", "stage1", "-c", "killed.toml", "--resume", "-q", cwd=tmp_path)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read().decode()

    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    log_a = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "killed" / "log.jsonl").read_text().splitlines()

    def losses(lines):
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    assert losses(log_a) == losses(log_b) and len(log_a) == 6
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step-00000025", "step-00000030"]  # keep_last = 2, no temporary leftovers


@pytest.mark.slow
def test_prefetch_workers_and_time_limit_then_resume_match_plain_run(tmp_path: Path):
    """Batches built ahead in 2 worker processes are the batches of the plain loop; a run stopped by
    its time limit records the position of the last *consumed* batch, so resuming it (again with
    workers) ends with the plain run's weights, bit for bit."""
    _write_data(tmp_path)
    for name in ("plain", "workers"):
        (tmp_path / f"{name}.toml").write_text(CONFIG.format(out=name))
    plain = rosim("train", "stage1", "-c", "plain.toml", "-q", cwd=tmp_path)
    assert plain.wait(timeout=180) == 0, plain.stderr.read().decode()

    stopped = rosim("train", "stage1", "-c", "workers.toml", "-q", "--set", "train.data_workers=2",
                    "--set", "train.time_limit_s=0.2", cwd=tmp_path)
    assert stopped.wait(timeout=180) == 0, stopped.stderr.read().decode()
    meta = json.loads((tmp_path / "workers" / "final" / "config.json").read_text())
    log = (tmp_path / "workers" / "log.jsonl").read_text().splitlines()
    assert len(log) < 6, "the time limit did not stop the run early"
    assert meta  # a final model was written at the stop

    resumed = rosim("train", "stage1", "-c", "workers.toml", "-q", "--resume", "--set", "train.data_workers=2",
                    cwd=tmp_path)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read().decode()
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "workers" / "final" / "model.safetensors")
    for k in a:
        assert (a[k] == b[k]).all(), k
