"""`rosim serve` as a user starts it: a real process on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from rosim.checkpoints.io import save_checkpoint
from rosim.cli import main
from tests.helpers import SENTENCES, tiny_model

RUN_CLI = "import sys; from rosim.cli import main; sys.exit(main())"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tok = tiny_model()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, tok)


@pytest.fixture(scope="module")
def index_dir(checkpoint, tmp_path_factory):
    pytest.importorskip("faiss")
    from rosim.index import VectorIndex
    from rosim.inference.sim_model import SimModel

    return VectorIndex.build(SimModel.load(checkpoint), SENTENCES).save(tmp_path_factory.mktemp("idx") / "idx")


def test_serve_process_answers_and_stops(checkpoint, index_dir):
    port = _free_port()
    env = {**os.environ, "ROSIM_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, "serve", "--model", str(checkpoint),
                             "--port", str(port), "--log-level", "warning", "--max-texts", "3",
                             "--index", str(index_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # generous: starting means importing torch, on a shared machine
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=5).json()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"rosim serve did not come up (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")
                time.sleep(0.2)
        assert health["auth_required"] is True and health["limits"]["max_texts"] == 3
        assert health["model"]["name"] == str(checkpoint.resolve())
        assert health["index"]["size"] == len(SENTENCES)
        # generation runs in its own process, ready before the server answers
        child = health["generation"]
        assert child["mode"] == "process" and child["status"] == "ready" and child["pid"] not in (None, proc.pid)
        r = httpx.post(f"{base}/similar", json={"texts": "今天天气不错", "n": 4, "k": 2, "max_new_tokens": 4},
                       headers={"X-API-Key": "k3y"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["similar"]) <= 2
        r = httpx.post(f"{base}/search", json={"texts": "电影不错", "k": 2}, headers={"X-API-Key": "k3y"})
        assert r.json()["results"][0]["neighbors"][0]["text"] == "电影不错"
        assert httpx.post(f"{base}/encode", json={"texts": ["今天"]}).status_code == 401
        r = httpx.post(f"{base}/similarity", json={"a": "今天天气不错", "b": "今天天气很好"},
                       headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and isinstance(r.json()["scores"], float)
        r = httpx.post(f"{base}/encode", json={"texts": ["a", "b", "c", "d"]}, headers={"X-API-Key": "k3y"})
        assert r.status_code == 422 and "at most 3" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    with pytest.raises(ProcessLookupError):  # the generation process stopped with the server: no orphan
        os.kill(child["pid"], 0)
    assert f"serving {checkpoint.resolve()} on http://127.0.0.1:{port}/ (docs at /docs), /search on" in err


def test_serve_rejects_bad_options(checkpoint, capsys):
    assert main(["serve", "--model", str(checkpoint), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--max-texts", "0"]) == 2
    assert "max_texts must be positive" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint / "missing")]) == 2
    assert main(["serve", "--model", str(checkpoint), "--index", str(checkpoint / "no-index")]) == 2
    assert "index directory not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--generation", "fork"]) == 2
    assert "--generation must be 'process' or 'thread'" in capsys.readouterr().err


def test_serve_help_lists_the_options(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--index", "--host", "--port", "--api-key", "--no-batching", "--max-wait-ms",
                   "--generation", "--generation-threads"):
        assert option in out
