import hashlib
import json

import numpy as np
import pytest
import typer

import rosim.cli as cli
from rosim.cli import closed_forms as cf

POS = ["这本书很好", "服务好，价格也好", "好看好用", "质量很好值得买", "非常好的一次体验", "好评，好！",
       "物流快，东西好", "好极了", "包装好", "老板人好"]
NEG = ["太差了", "质量差，不推荐", "差评", "服务很差很差", "东西差，退货", "差劲", "体验差",
       "又慢又差", "做工差", "真差"]


class FakeEncoder:
    """Deterministic 'sentence vectors': noise seeded by the text, plus a sentiment direction."""

    def __init__(self, dim=8, fingerprint="fake-1"):
        self.dim, self.fingerprint, self.calls = dim, fingerprint, []

    def identity(self):
        return {"name": "fake", "fingerprint": self.fingerprint, "dim": self.dim}

    def encode(self, texts, batch_size=64, normalize=True, show_progress_bar=None):
        self.calls.append({"n": len(texts), "normalize": normalize, "batch_size": batch_size})
        rows = []
        for t in texts:
            v = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim)
            v[0] += 4 * t.count("好") - 4 * t.count("差")
            rows.append(v)
        x = np.asarray(rows, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x


@pytest.fixture
def fake(monkeypatch):
    enc = FakeEncoder()
    models = []

    def load(model):
        models.append(model)
        return enc

    monkeypatch.setattr(cf, "_load_encoder", load)
    enc.models = models
    return enc


@pytest.fixture
def run(monkeypatch, capsys):
    """rosim's real main() (its error handling and exit codes) with only these commands registered."""

    def invoke(*args):
        app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
        monkeypatch.setattr(cli, "app", app)
        monkeypatch.setattr(cli, "_register", lambda: cf.register(app))
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def write_train(path, lines=None):
    lines = lines or [f"{t}\tpos" for t in POS] + [f"{t}\tneg" for t in NEG]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fit_then_predict(tmp_path, fake, run):
    train = write_train(tmp_path / "train.tsv")
    code, out, err = run("classify", "fit", train, "-o", tmp_path / "clf")
    assert code == 0, err
    assert "fitted 20 texts, 2 labels" in out and "training accuracy 100.00%" in out
    assert fake.calls[-1]["normalize"] is False and fake.calls[-1]["batch_size"] == 64
    assert fake.models == [None]  # no --model: the default model
    params = json.loads((tmp_path / "clf" / "config.json").read_text(encoding="utf-8"))["params"]
    assert params == {"priors": None, "shrinkage": "auto", "whiten": True}  # the CLI's defaults
    (tmp_path / "new.txt").write_text("真好\n\n太差\n好好好\n", encoding="utf-8")
    code, out, err = run("classify", "predict", tmp_path / "clf", tmp_path / "new.txt")
    assert code == 0, err
    assert out.splitlines() == ["pos", "neg", "pos"]
    code, out, _ = run("classify", "predict", tmp_path / "clf", tmp_path / "new.txt", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4] and rows[1]["text"] == "太差"
    assert rows[0]["label"] == "pos" and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-6


def test_fit_records_model_and_predict_refuses_another(tmp_path, fake, run):
    train = write_train(tmp_path / "train.tsv")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert run("classify", "fit", train, "-o", tmp_path / "clf", "--model", model_dir,
               "--shrinkage", "0.2", "--no-whiten")[0] == 0
    meta = json.loads((tmp_path / "clf" / "config.json").read_text(encoding="utf-8"))
    assert meta["metadata"]["encoder"]["path"] == str(model_dir.resolve())
    assert meta["params"] == {"priors": None, "shrinkage": 0.2, "whiten": False}
    (tmp_path / "x.txt").write_text("好\n", encoding="utf-8")
    assert run("classify", "predict", tmp_path / "clf", tmp_path / "x.txt")[0] == 0
    assert fake.models[-1] == model_dir.resolve()  # the recorded model is used again
    fake.fingerprint = "other"
    code, _, err = run("classify", "predict", tmp_path / "clf", tmp_path / "x.txt")
    assert code == 2 and "fitted on vectors of fake" in err
    fake.fingerprint, fake.dim = "fake-1", 5
    code, _, err = run("classify", "predict", tmp_path / "clf", tmp_path / "x.txt")
    assert code == 2 and "5-d vectors" in err and "expects 8-d" in err


def test_fit_bad_input_exits_2(tmp_path, fake, run):
    code, _, err = run("classify", "fit", tmp_path / "missing.tsv", "-o", tmp_path / "clf")
    assert code == 2 and "missing.tsv" in err
    bad = write_train(tmp_path / "bad.tsv", ["好\tpos", "差\tneg", "no tab here", "x\ty"])
    code, _, err = run("classify", "fit", bad, "-o", tmp_path / "clf")
    assert code == 2 and f"{bad}:3: expected 'text<TAB>label'" in err
    empty_label = write_train(tmp_path / "el.tsv", ["好\tpos", "差\t "])
    code, _, err = run("classify", "fit", empty_label, "-o", tmp_path / "clf")
    assert code == 2 and f"{empty_label}:2: empty label" in err
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("好\tpos\n".encode() + "差\tneg\n".encode("gbk"))
    code, _, err = run("classify", "fit", latin, "-o", tmp_path / "clf")
    assert code == 2 and f"{latin}:2: not UTF-8" in err
    one = write_train(tmp_path / "one.tsv", ["好\tpos", "很好\tpos"])
    code, _, err = run("classify", "fit", one, "-o", tmp_path / "clf")
    assert code == 2 and "at least 2 labels" in err
    good = write_train(tmp_path / "train.tsv")
    code, _, err = run("classify", "fit", good, "-o", tmp_path / "clf", "--shrinkage", "lots")
    assert code == 2 and "--shrinkage" in err
    assert not (tmp_path / "clf").exists()
    code, _, err = run("classify", "predict", tmp_path / "nothing", good)
    assert code == 2 and "no saved classifier" in err


def test_compare(tmp_path, fake, run):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("\n".join(POS) + "\n", encoding="utf-8")
    b.write_text("\n".join(NEG) + "\n", encoding="utf-8")
    code, out, err = run("compare", a, b)
    assert code == 0, err
    for name in ("KL(A||B)", "KL(B||A)", "Bhattacharyya", "Hellinger", "W2", "W2^2"):
        assert name in out
    assert fake.calls[-1]["normalize"] is True
    code, out, _ = run("compare", a, a, "--json", "--shrinkage", "none", "--no-normalize")
    res = json.loads(out)
    assert res["n_a"] == 10 and res["dim"] == 8 and res["shrinkage"] is None
    assert res["kl_a_b"] == 0 and res["w2_squared"] < 1e-12 and res["hellinger"] < 1e-6
    code, out, _ = run("compare", a, b, "--json")
    res = json.loads(out)
    assert res["kl_a_b"] > 1 and 0 < res["hellinger"] <= 1 and res["w2"] > 0.5
    single = tmp_path / "one.txt"
    single.write_text("好\n", encoding="utf-8")
    code, _, err = run("compare", a, single)
    assert code == 2 and "at least 2" in err
    code, _, err = run("compare", a, tmp_path / "nope.txt")
    assert code == 2 and "nope.txt" in err
