"""Issue 17 item 8: concurrent writers of one index take turns or are refused; readers never see
a half-replaced index."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rosim.cli import main
from rosim.errors import InputError
from rosim.textio import output_lock

faiss = pytest.importorskip("faiss")
from rosim.index import VectorIndex  # noqa: E402


def _index(n: int, seed: int) -> VectorIndex:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = VectorIndex(8)
    index.add([f"句子{seed}-{i}" for i in range(n)], vecs)
    return index


def test_saves_racing_each_other_all_succeed(tmp_path):
    target = tmp_path / "idx"
    errors = []

    def saver(seed):
        try:
            for _ in range(5):
                _index(20 + seed, seed).save(target)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert VectorIndex.load(target).ntotal in range(20, 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary or lock left behind


def test_loads_during_repeated_saves_never_report_damage(tmp_path):
    target = tmp_path / "idx"
    small, large = _index(30, 1), _index(300, 2)
    small.save(target)
    stop = threading.Event()

    def saver():
        while not stop.is_set():
            for index in (large, small):
                index.save(target)

    thread = threading.Thread(target=saver)
    thread.start()
    failures, loads = [], 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                assert VectorIndex.load(target).ntotal in (30, 300)
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert loads > 20 and failures == [], failures[:3]


HOLD = """
import sys, time
from rosim.textio import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_build_into_the_same_output_is_refused(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("今天\n明天\n", encoding="utf-8")
    target = tmp_path / "idx"
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"  # another process is writing idx
        assert main(["index", "build", str(corpus), "-o", str(target), "-q"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another rosim process" in err and len(err.strip().splitlines()) == 1
        assert not target.exists()
    finally:
        other.kill()
        other.wait()
    # the killed holder leaves its lock file; the next build takes it and removes it
    assert main(["index", "build", str(corpus), "-o", str(target), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "idx"]


def test_output_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    target = tmp_path / "out"
    with output_lock(target, wait=False), output_lock(target, wait=False):
        refused = []
        t = threading.Thread(target=lambda: _try(target, refused))
        t.start()
        t.join()
        assert refused == [True]
    with output_lock(target, wait=False):
        pass
    assert not (tmp_path / ".out.lock").exists()


def _try(target, out):
    try:
        with output_lock(target, wait=False):
            out.append(False)
    except InputError:
        out.append(True)
